"""Rule: hand-written attention, scores -> softmax -> weighted sum of values.

Pattern (anchored at the softmax over the last axis, softmax or _safe_softmax):
    scores = q @ k^T   (matmul / bmm / einsum, BHSD or BSHD, 3-D with heads folded;
                        baddbmm(bias, q, k^T, alpha=a) is q @ k^T scaled by a plus the bias)
    scores = scores * c | scores / c            (any number, constants; none = pre-scaled q)
    scores = tanh(scores / cap) * cap           (optional softcap)
    scores = scores + mask | scores.masked_fill(cond, fill)
             | where(keep, scores, fill) | where(cond, fill, scores)
    probs  = softmax(scores [.float()], -1) [.to(q.dtype) | .type_as(scores)] [dropout(p=0 or eval)]
    out    = probs @ v  (matmul / bmm / einsum)
Casts between float dtypes, clones, views between [B*H, T, L] and [B, H, T, L] (heads folded into
the batch) and maximum(scores, finfo.min) may sit anywhere in the chain (GSA computes in float32);
several additive masks (Bloom's ALiBi through baddbmm, then the mask) are summed into one.
A fill is a number or a constant tensor (torch.full((), v), torch.tensor(v)) at or below -1e4.
Check: every intermediate has one reader that uses its values (type_as / expand_as read only
its dtype or shape), scale before softcap before mask, at most one mask, softmax over keys, the
two operands of an add are not both products (q @ r^T + q @ k^T: which one holds the keys is not
provable). Anything else between two products is reported with the op that stopped the rule.
Rewrite record: q, k (repeat unwrapped, layout permutations), v, mask, scale, softcap; a finite
fill is recorded so that a row whose every key is masked gives eager's answer (the mean of V).
In-place updates of the scores (`scores += bias`, `scores.masked_fill_(...)`) arrive here as
their functional forms (match_attention functionalizes them first).
Rewrite (graph, before the site replaces the chain): type_as(x, scores) becomes x.to(dtype) and
expand_as(mask, scores) the mask itself, so that nothing outside the replaced chain keeps
reading the dense scores."""

from __future__ import annotations

import math
import operator
from typing import Optional, Union

import torch
from torch import fx

from ..fx_utils import arg, bound_args, dtype, is_op, module_path, normalize_dim, op_name, real_users, shape, value
from .record import AttentionMatch, NotProvable
from .repeat_kv import unwrap_repeat

PRODUCTS = ("matmul", "bmm", "einsum", "baddbmm")
# A fill at or below this is "masked": softmax gives such keys weight exp(-1e4) ~ 0 in any dtype.
MASK_FILL_LIMIT = -1e4
# maximum(scores, c) with c at or below this changes no finite score (finfo.min of every float dtype is below).
CLAMP_LIMIT = -1e30
# Ops the scores pass through on their way to the softmax (what _leads_to_product follows).
SCORE_STEPS = ("cast", "mul", "div", "add", "masked_fill", "where", "tanh", "contiguous", "reshape",
               "maximum")
# Readers of a tensor that use only its dtype or shape (the tensor is their second operand).
METADATA_READERS = ("type_as", "expand_as")
# How far around a softmax to look for the two products of a candidate the rule could not read.
CANDIDATE_DEPTH = 8


def match(node: fx.Node) -> Union[AttentionMatch, NotProvable, None]:
    if not is_op(node, "softmax"):
        return None
    found = _match(node)
    if not isinstance(found, AttentionMatch):
        sink = _sink_reason(node)
        if sink:
            return NotProvable(node, sink)
    if found is None and _between_products(node):
        return NotProvable(node, "a softmax between two products, but the steps around it are not the scale / "
                                 "softcap / mask / cast chain of attention that the rule reads")
    return found


def _match(node: fx.Node) -> Union[AttentionMatch, NotProvable, None]:
    scores_shape = shape(node)
    if scores_shape is None or len(scores_shape) not in (3, 4):
        return None
    dim = arg(node, 1, "dim")
    if not isinstance(dim, int) or normalize_dim(dim, len(scores_shape)) != len(scores_shape) - 1:
        return NotProvable(node, f"softmax over dim {dim}, not over the keys (last axis)")
    pv = _down_to_weighted_sum(node)
    if isinstance(pv, NotProvable) or pv is None:
        return pv
    pv_node, probs_input, zero_fills = pv
    chain = _up_to_scores(node.args[0])
    if isinstance(chain, NotProvable) or chain is None:
        return chain
    qk_node, steps = chain
    record = _scores_record(qk_node, steps, node)
    if isinstance(record, NotProvable):
        return record
    if zero_fills:
        conditions = [payload[0] for kind, _, payload in steps if kind == "fill_mask"]
        for zero_fill in zero_fills:
            if len(conditions) != 1 or not _same_value(zero_fill.args[1], conditions[0]):
                return NotProvable(zero_fill, "the probabilities are zeroed where the scores were not masked; only "
                                              "the scores' own mask condition is read")
        # Rows with every key masked are zero then, as the site gives them without a finite fill.
        record = (*record[:-1], None)
    found = _finish(record, qk_node, pv_node, probs_input, node)
    if isinstance(found, AttentionMatch):
        found.nodes = [qk_node, *(step[1] for step in reversed(steps)), node, pv_node]
    return found


def rewrite(found: AttentionMatch) -> None:
    """Make the chain's own nodes the only readers of the scores (see the module docstring)."""
    chain = found.nodes[:-1]
    for node in chain:
        for user in list(node.users):
            if user.op == "call_method" and user.target == "type_as" and user.args[0] is not node \
                    and dtype(node) is not None:
                with node.graph.inserting_before(user):
                    cast = node.graph.call_method("to", (user.args[0], dtype(node)))
                cast.meta.update(user.meta)
                user.replace_all_uses_with(cast)
                node.graph.erase_node(user)
                if found.output is user:
                    found.output = cast
    if found.mask_parts:
        found.attn_mask = _combined_mask(found.mask_parts, found.nodes[-2], found.nodes[0])
        found.mask_parts = None
    mask = found.attn_mask
    if is_op(mask, "expand_as") and mask.args[1] in chain:
        found.attn_mask = mask.args[0]
        for user in list(mask.users):
            user.replace_input_with(mask, mask.args[0])
        mask.graph.erase_node(mask)


def _combined_mask(parts: list, softmax: fx.Node, product: fx.Node) -> fx.Node:
    """One additive mask in the product's layout: a fill mask becomes 0 where kept and the fill
    elsewhere, each part applied under a [B, H, T, L] view of folded heads is expanded to it and
    folded back (B*H first), then the parts are summed."""
    graph = softmax.graph
    combined = None
    with graph.inserting_before(softmax):
        for mask, unfolded, kind, fill in parts:
            if kind != "add_mask":
                # keep_mask: True keeps; fill_mask: True is filled.
                kept, filled = (0.0, fill) if kind == "keep_mask" else (fill, 0.0)
                mask = graph.call_function(torch.where, (mask, kept, filled))
                mask = graph.call_method("to", (mask, dtype(product) or torch.float32))
            if unfolded is not None:
                batch, heads = _leading_sizes(unfolded)
                mask = graph.call_method("flatten", (graph.call_method("expand", (mask, batch, heads, -1, -1)), 0, 1))
            combined = mask if combined is None else graph.call_function(operator.add, (combined, mask))
    return combined


def _value_users(node: fx.Node) -> list[fx.Node]:
    """Users that read the values of `node` (not only its dtype or shape, not metadata asserts)."""
    return [user for user in real_users(node)
            if not (user.op == "call_method" and user.target in METADATA_READERS and len(user.args) > 1
                    and user.args[1] is node and user.args[0] is not node)
            and not _only_shifts(user, node)]


def _row_max_source(node) -> Optional[fx.Node]:
    """x when node is the max of x over the last axis with that axis kept (x.max(-1,
    keepdim=True).values, x.amax(-1, keepdim=True), either detached), else None."""
    while is_op(node, "detach"):
        node = node.args[0]
    pair = is_op(node, "getitem") and node.args[1] == 0
    reduction = node.args[0] if pair else node
    if not (is_op(reduction, "maximum") if pair else is_op(reduction, "amax")) or not reduction.args:
        return None
    source, dim, keepdim = reduction.args[0], arg(reduction, 1, "dim"), arg(reduction, 2, "keepdim", False)
    dim = dim[0] if isinstance(dim, (list, tuple)) and len(dim) == 1 else dim
    rank = len(shape(source) or ())
    if not isinstance(source, fx.Node) or not isinstance(dim, int) or keepdim is not True or not rank \
            or normalize_dim(dim, rank) != rank - 1:
        return None
    return source


def _shifted_by_row_max(node: fx.Node) -> Optional[fx.Node]:
    """x when node is x - (the max of x over the last axis), else None."""
    source, shift = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if len(node.args) > 2 or node.kwargs.get("alpha", 1) != 1:
        return None
    return source if isinstance(source, fx.Node) and _row_max_source(shift) is source else None


def _only_shifts(user: fx.Node, node: fx.Node) -> bool:
    """Whether `user` starts the row max of `node` that only shifts `node` (x - max(x)): it
    reads node's values only for a shift softmax does not see."""
    current = user
    while len(current.users) == 1:
        following = next(iter(current.users))
        if not (is_op(following, "detach") or (is_op(following, "getitem") and following.args[1] == 0)):
            break
        current = following
    return _row_max_source(current) is node and bool(current.users) and all(
        is_op(shift, "sub") and _shifted_by_row_max(shift) is node for shift in current.users)


SINK_REASON = ("attention sinks (an extra logit per head in the softmax denominator{how}): a GSA site has no sink "
               "term; left dense")


def _sink_reason(softmax: fx.Node) -> str:
    """Why a softmax is attention with sinks, or '': its input is the scores concatenated with
    one more logit on the key axis (gpt-oss, MiMo, Flint), or the scores' log-sum-exp is taken
    beside it (a sink applied as an output rescaling, GraniteMoe-SWA)."""
    current, rank = softmax.args[0] if softmax.args else None, len(shape(softmax) or ())
    for _ in range(16):
        if not isinstance(current, fx.Node):
            return ""
        if any(is_op(user, "logsumexp") for user in current.users) and _leads_to_product(current):
            return SINK_REASON.format(how=", applied by rescaling the output with the scores' log-sum-exp")
        if is_op(current, "cat"):
            tensors, dim = current.args[0], arg(current, 1, "dim", 0)
            if isinstance(tensors, (list, tuple)) and isinstance(dim, int) and rank \
                    and normalize_dim(dim, rank) == rank - 1 and any(_leads_to_product(t) for t in tensors):
                return SINK_REASON.format(how=", concatenated to the scores")
            return ""
        if is_op(current, "sub") and _shifted_by_row_max(current) is not None:
            current = current.args[0]
        elif op_name(current) in SCORE_STEPS and current.args:
            current = current.args[0]
        else:
            return ""
    return ""


def _down_to_weighted_sum(softmax: fx.Node):
    """Follow casts, clones and no-op dropout to the product with values: (pv_node, probs
    operand, the zero fills of the probabilities on the way). probs.masked_fill(cond, 0) with
    cond the scores' own fill condition (CPM-Ant) only zeroes what is already zero, and the
    rows whose every key is masked."""
    current, zero_fills = softmax, []
    while True:
        users = _value_users(current)
        if len(users) != 1:
            return NotProvable(softmax, "attention probabilities are read elsewhere too (returned or reused); "
                                        "replacing them is not equivalent")
        user = users[0]
        if is_op(user, "cast", "contiguous") or (is_op(user, "reshape") and _folds_heads(user)):
            current = user
            continue
        if is_op(user, "dropout"):
            reason = _dropout_is_identity(user)
            if reason:
                return NotProvable(softmax, reason)
            current = user
            continue
        if is_op(user, "masked_fill") and user.args[0] is current and _constant(arg(user, 2, "value")) == 0:
            zero_fills.append(user)
            current = user
            continue
        if is_op(user, *PRODUCTS):
            return user, current, zero_fills
        if _reaches(user, PRODUCTS, downstream=True):
            return NotProvable(user, f"{_describe(user)} between the softmax and the product with values is not "
                                     f"a cast, clone or no-op dropout")
        return None


def _dropout_is_identity(node: fx.Node) -> str:
    args = bound_args(node)
    p = args.get("p", args.get("1", 0.5))
    train = args.get("train", args.get("training", args.get("2", True)))
    if (isinstance(p, (int, float)) and p == 0) or train is False:
        return ""
    return f"dropout(p={p}, training={train}) on attention probabilities is not an identity"


def _up_to_scores(node):
    """Walk from the softmax input to the q @ k^T product: (product node, steps nearest-first)."""
    steps = []
    current = node
    while isinstance(current, fx.Node) and not is_op(current, *PRODUCTS):
        name = op_name(current)
        if name in ("cast", "contiguous"):
            steps.append(("cast", current, None))
            nxt = current.args[0]
        elif name == "maximum" and _clamps_minus_inf(current):
            steps.append(("cast", current, None))
            nxt = current.args[0]
        elif name == "reshape" and _folds_heads(current):
            steps.append(("fold", current, None))
            nxt = current.args[0]
        elif name == "sub" and _shifted_by_row_max(current) is not None:
            # softmax(x - max(x, -1)) is softmax(x): the shift is only for fp16 / bf16 range.
            steps.append(("cast", current, None))
            nxt = current.args[0]
        elif name in ("mul", "div"):
            tensor_arg, const = _tensor_and_constant(current)
            softcap = _softcap_of(current) if name == "mul" and tensor_arg is not None else None
            if softcap is not None:
                steps.append(("softcap", current, softcap[1]))
                nxt = softcap[0]
            elif tensor_arg is not None:
                steps.append(("scale", current, const if name == "mul" else 1.0 / const))
                nxt = tensor_arg
            else:
                scores_side, factor = _graph_scale(current)
                if scores_side is None:
                    return NotProvable(current, f"{name} of the scores by a tensor that is not a scalar; not a scale "
                                                f"(a multiplicative mask such as w * b - 1e4 * (1 - b) is not read)")
                if is_op(scores_side, "tanh"):
                    return NotProvable(current, "the softcap value is computed in the graph (e.g. dynamic=True made "
                                                "it symbolic); GSA takes a constant softcap")
                steps.append(("graph_scale", current, (factor, name)))
                nxt = scores_side
        elif name == "add":
            left, right = current.args[0], current.args[1] if len(current.args) > 1 else current.kwargs.get("other")
            if _leads_to_product(left) and _leads_to_product(right):
                return NotProvable(current, "both operands of the add are products (q @ r^T + q @ k^T, a relative "
                                            "position bias?): which one holds the keys is not provable")
            scores_side, mask = _pick_scores_side(left, right)
            if scores_side is None:
                return None
            if bound_args(current).get("alpha", 1) not in (1, None):
                return NotProvable(current, "add with alpha != 1 on scores")
            # A number added to every score (XLNet's absent segment term) is a shift softmax does not see.
            constant = isinstance(mask, (int, float)) and not isinstance(mask, bool) and math.isfinite(mask)
            steps.append(("cast", current, None) if constant else ("add_mask", current, mask))
            nxt = scores_side
        elif name == "masked_fill":
            fill = _fill_value(arg(current, 2, "value"))
            if fill is None:
                return NotProvable(current, f"masked_fill value {arg(current, 2, 'value')!r} is not a constant at or "
                                            f"below {MASK_FILL_LIMIT} (or -inf)")
            steps.append(("fill_mask", current, (current.args[1], fill)))
            nxt = current.args[0]
        elif name == "where":
            cond, keep, other = (list(current.args) + [None] * 3)[:3]
            fill, other_fill = _fill_value(other), _fill_value(keep)
            if fill is not None and _leads_to_product(keep):
                steps.append(("keep_mask", current, (cond, fill)))
                nxt = keep
            elif other_fill is not None and _leads_to_product(other):
                steps.append(("fill_mask", current, (cond, other_fill)))
                nxt = other
            else:
                return NotProvable(current, f"where(..., {keep!r}, {other!r}) is not a mask fill with a constant at or "
                                            f"below {MASK_FILL_LIMIT} (or -inf)")
        elif _reaches(current, PRODUCTS, downstream=False):
            return NotProvable(current, f"{_describe(current)} between the scores product and the softmax is not a "
                                        f"scale, softcap, mask, cast or clone")
        else:
            return None
        if len(_value_users(current)) != 1:
            return NotProvable(current, "attention scores are read elsewhere too; replacing them is not equivalent")
        current = nxt
    if not isinstance(current, fx.Node):
        return None
    if len(_value_users(current)) != 1:
        return NotProvable(current, "attention scores are read elsewhere too; replacing them is not equivalent")
    if is_op(current, "baddbmm"):
        found = _baddbmm_steps(current)
        if isinstance(found, NotProvable):
            return found
        steps.extend(found)
    return current, steps


def _baddbmm_steps(node: fx.Node):
    """baddbmm(bias, q, k^T, beta=b, alpha=a) = a * (q @ k^T) + b * bias: a scale, then the bias as
    an additive mask (b = 1) or nothing (b = 0); steps nearest-first like _up_to_scores."""
    beta, alpha = arg(node, 3, "beta", 1), arg(node, 4, "alpha", 1)
    if node.op == "call_method":
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (alpha, beta)):
        return NotProvable(node, f"baddbmm with alpha={alpha!r}, beta={beta!r}: only constants are read")
    steps = [("scale", node, float(alpha))]
    if beta == 0:
        return steps
    if beta != 1:
        return NotProvable(node, f"baddbmm with beta={beta}: the bias would have to be scaled; only beta 1 or 0")
    return [("add_mask", node, node.args[0]), *steps]


def _product_operands(node: fx.Node) -> tuple:
    """(left, right) of a scores or values product (baddbmm: its batch1, batch2)."""
    if is_op(node, "baddbmm"):
        args = list(node.args) + [None] * 3
        return node.kwargs.get("batch1", args[1]), node.kwargs.get("batch2", args[2])
    return node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")


def _fill_value(fill) -> Optional[float]:
    """The constant a mask fills with, when it is a number or a constant tensor at or below the limit."""
    fill = _constant(fill)
    return None if fill is None or fill > MASK_FILL_LIMIT else fill


def _constant(fill) -> Optional[float]:
    """A number, or the value of a constant tensor (torch.full((), v), torch.tensor(v), a 1-element buffer)."""
    if isinstance(fill, fx.Node):
        if is_op(fill, "full"):
            fill = arg(fill, 2 if fill.op == "call_method" else 1, "fill_value")
        elif is_op(fill, "scalar_tensor"):
            fill = fill.args[0] if fill.args else None
        elif fill.op == "get_attr":
            owner = fill.graph.owning_module
            constant = getattr(owner, str(fill.target), None) if owner is not None else None
            fill = constant.item() if isinstance(constant, torch.Tensor) and constant.numel() == 1 else None
    if isinstance(fill, bool) or not isinstance(fill, (int, float)):
        return None
    return float(fill)


def _same_value(a, b, depth: int = 8) -> bool:
    """Whether a and b are the same computation of the same inputs: the same node, equal
    constants, or calls of one known pure op on arguments that are the same value (CPM-Ant
    spells its mask condition twice)."""
    if a is b:
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y, depth) for x, y in zip(a, b))
    if not isinstance(a, fx.Node) or not isinstance(b, fx.Node):
        return not isinstance(a, (fx.Node, torch.Tensor)) and not isinstance(b, (fx.Node, torch.Tensor)) \
            and type(a) is type(b) and a == b
    if depth == 0 or a.op != b.op or a.target != b.target or op_name(a) is None \
            or len(a.args) != len(b.args) or set(a.kwargs) != set(b.kwargs):
        return False
    return all(_same_value(x, y, depth - 1) for x, y in zip(a.args, b.args)) \
        and all(_same_value(a.kwargs[name], b.kwargs[name], depth - 1) for name in a.kwargs)


def _reaches(node: fx.Node, names: tuple, downstream: bool) -> bool:
    """Whether an op in `names` is within CANDIDATE_DEPTH steps of node (through users or inputs)."""
    frontier, seen = [node], set()
    for _ in range(CANDIDATE_DEPTH):
        following = []
        for current in frontier:
            if current in seen:
                continue
            seen.add(current)
            if current is not node and is_op(current, *names):
                return True
            following.extend(current.users if downstream else current.all_input_nodes)
        frontier = following
    return False


def _between_products(softmax: fx.Node) -> bool:
    return _reaches(softmax, PRODUCTS, downstream=False) and _reaches(softmax, PRODUCTS, downstream=True)


def _describe(node: fx.Node) -> str:
    target = node.target if node.op == "call_method" else getattr(node.target, "__name__", str(node.target))
    return f"{target} ({node.name})"


def _tensor_and_constant(node: fx.Node):
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if isinstance(a, fx.Node) and isinstance(b, (int, float)) and not isinstance(b, bool):
        return a, float(b)
    if node.op == "call_function" and op_name(node) == "mul" and isinstance(b, fx.Node) and isinstance(a, (int, float)):
        return b, float(a)
    return None, None


def _graph_scale(node: fx.Node):
    """(scores operand, factor node) of scores * s or scores / s where s is a scalar the graph
    computes (a symbolic number or a 0-d tensor)."""
    a, b = node.args[0], node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    candidates = ((a, b), (b, a)) if op_name(node) == "mul" else ((a, b),)
    for scores_side, factor in candidates:
        if isinstance(scores_side, fx.Node) and isinstance(factor, fx.Node) and _is_scalar(factor) \
                and _leads_to_product(scores_side):
            return scores_side, factor
    return None, None


def _is_scalar(node: fx.Node) -> bool:
    val = value(node)
    if isinstance(val, torch.Tensor):
        return val.dim() == 0
    return isinstance(val, (int, float, torch.SymInt, torch.SymFloat))


def _softcap_of(node: fx.Node):
    """(input, cap) when node is tanh(x / cap) * cap or tanh(x * (1/cap)) * cap."""
    inner, cap = _tensor_and_constant(node)
    if inner is None or not is_op(inner, "tanh") or len(real_users(inner)) != 1:
        return None
    divided = inner.args[0]
    if not isinstance(divided, fx.Node) or len(real_users(divided)) != 1:
        return None
    source, const = _tensor_and_constant(divided)
    if source is None or const == 0:
        return None
    inverse = 1.0 / const if op_name(divided) == "mul" else const
    if op_name(divided) not in ("mul", "div") or not math.isclose(inverse, cap, rel_tol=1e-6):
        return None
    return source, cap


def _pick_scores_side(left, right):
    """(scores operand, mask operand) of an add: the scores side leads down to a product."""
    for scores_side, mask in ((left, right), (right, left)):
        if isinstance(scores_side, fx.Node) and _leads_to_product(scores_side):
            return scores_side, mask
    return None, None


def _leads_to_product(node) -> bool:
    for _ in range(64):  # a chain of score steps is short; a bound keeps odd graphs finite
        if not isinstance(node, fx.Node):
            return False
        if is_op(node, *PRODUCTS):
            return True
        if op_name(node) not in SCORE_STEPS + ("tanh",) or not node.args:
            return False
        node = node.args[1] if op_name(node) == "where" and len(node.args) > 1 else node.args[0]
    return False


def _scores_record(qk_node: fx.Node, steps: list, softmax: fx.Node):
    """Scale, softcap and mask from the steps, read from the product towards the softmax.
    Several additive masks are summed; each is kept with the view (of heads folded into the
    batch, as [B, H, T, L]) it was added under, for the site to read it in the product's layout."""
    scale, softcap, masks, mask_kind, graph_scale, fill = 1.0, None, [], "", None, None
    unfolded = None  # the view [B*H, T, L] -> [B, H, T, L] the scores are under, if any
    product_rank = len(shape(qk_node) or ())
    for kind, node, payload in reversed(steps):
        if kind == "cast":
            continue
        if kind == "fold":
            unfolded = node if len(shape(node)) != product_rank else None
            continue
        if kind in ("scale", "graph_scale"):
            if softcap is not None or masks:
                return NotProvable(node, "scores are scaled after the softcap or the mask; SDPA scales first")
            if kind == "scale":
                scale *= payload
            elif graph_scale is not None:
                return NotProvable(node, "scores are scaled by more than one value computed in the graph")
            else:
                graph_scale = payload
        elif kind == "softcap":
            if masks or softcap is not None:
                return NotProvable(node, "softcap applied after the mask (or twice)")
            softcap = payload
        else:
            mask, mask_fill = (payload, None) if kind == "add_mask" else payload
            if kind == "add_mask" and not _is_float_tensor(mask):
                added = _describe(mask) if isinstance(mask, fx.Node) else repr(mask)
                return NotProvable(softmax, f"what is added to the scores ({added}) is not a float tensor of the graph")
            if kind != "add_mask" and not isinstance(mask, fx.Node):
                return NotProvable(softmax, f"the mask condition {mask!r} is not a tensor of the graph")
            if unfolded is not None and _leading_sizes(unfolded) is None:
                return NotProvable(node, "scores viewed as [B, H, T, L] without explicit batch and head sizes")
            masks.append((mask, unfolded, kind, mask_fill))
    if len(masks) == 1 and masks[0][1] is None:
        mask_kind, fill = masks[0][2], masks[0][3]
    elif masks:
        # Summed as additive masks: a fill there must be one no score can get near (finfo.min),
        # so that score + fill rounds to the fill as the eager fill does.
        for _, _, kind, mask_fill in masks:
            if kind != "add_mask" and mask_fill > CLAMP_LIMIT:
                return NotProvable(softmax, f"a fill of {mask_fill} combined with other masks (or under a view of "
                                            f"folded heads) is not an additive mask; only fills at or below "
                                            f"{CLAMP_LIMIT:g} (finfo.min) combine")
        mask_kind, fill = "add_mask", None
    return scale, softcap, masks, mask_kind, graph_scale, fill


def _clamps_minus_inf(node: fx.Node) -> bool:
    """maximum(scores, c) with a constant c at or below CLAMP_LIMIT: equal to the scores
    wherever they are finite (it only turns -inf into c, as XGLM does with finfo.min)."""
    other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
    if not isinstance(other, fx.Node) or len(node.args) > 2:  # torch.max(x, dim) is a reduction
        return False
    limit = _fill_value(other)
    return limit is not None and limit <= CLAMP_LIMIT and _leads_to_product(node.args[0])


def _folds_heads(node: fx.Node) -> bool:
    """A view between [B*H, T, L] and [B, H, T, L] (the last two axes kept, the rest merged or split)."""
    before, after = shape(node.args[0]) if node.args else None, shape(node)
    if before is None or after is None or sorted((len(before), len(after))) != [3, 4]:
        return False
    return tuple(before[-2:]) == tuple(after[-2:]) and math.prod(before[:-2]) == math.prod(after[:-2])


def _leading_sizes(view: fx.Node):
    """(B, H) a view to [B, H, T, L] was given (numbers or graph values), or None."""
    sizes = view.args[1] if len(view.args) == 2 and isinstance(view.args[1], (list, tuple)) else view.args[1:]
    if len(sizes) != 4 or any(isinstance(size, int) and size < 0 for size in sizes[:2]):
        return None
    return sizes[0], sizes[1]


def _is_float_tensor(node) -> bool:
    dt = dtype(node)
    return dt is not None and dt.is_floating_point


def _finish(record, qk_node: fx.Node, pv_node: fx.Node, probs_input: fx.Node, softmax: fx.Node):
    scale, softcap, masks, mask_kind, graph_scale, fill = record
    mask = masks[0][0] if len(masks) == 1 and masks[0][1] is None else None
    layout = _layout_of(qk_node, pv_node, probs_input)
    if isinstance(layout, NotProvable):
        return layout
    query, key, value, permutes, key_transposed, rank = layout
    match = AttentionMatch(
        pattern=f"{op_name(qk_node)}_softmax",
        output=pv_node,
        query=query,
        key=key,
        value=value,
        attn_mask=mask,
        invert_mask=mask_kind == "fill_mask",
        finite_fill=fill is not None and math.isfinite(fill),
        scale=scale,
        scale_input=graph_scale,
        softcap=softcap,
        layout="3d" if rank == 3 else ("bshd" if permutes[0] is not None else "bhsd"),
        query_permute=permutes[0],
        key_permute=permutes[1],
        value_permute=permutes[2],
        output_permute=permutes[3],
        key_transposed=key_transposed,
        module_path=module_path(softmax),
        nodes=[qk_node, softmax, pv_node],
    )
    if mask is None and masks:
        match.mask_parts = masks
    if rank == 4 and match.key_permute is None and not key_transposed:
        source, groups, how = unwrap_repeat(key)
        value_source, value_groups, _ = unwrap_repeat(value) if match.value_permute is None else (value, 1, "")
        if groups > 1 and value_groups == groups:
            match.key, match.value, match.gqa_unwrapped = source, value_source, how
    return _check_heads(match, softmax)


def _layout_of(qk_node: fx.Node, pv_node: fx.Node, probs_input: fx.Node):
    """(q, k, v, [q_perm, k_perm, v_perm, out_perm], key_transposed, rank) or NotProvable."""
    if is_op(qk_node, "einsum"):
        return _einsum_layout(qk_node, pv_node, probs_input)
    if is_op(pv_node, "einsum"):
        return NotProvable(pv_node, "scores from a matmul but values summed by einsum; mixed spellings not proven")
    if is_op(pv_node, "baddbmm"):
        return NotProvable(pv_node, "values summed by baddbmm (a bias added to the output) is not attention")
    query, key_t = _product_operands(qk_node)
    if pv_node.args[0] is not probs_input:
        return NotProvable(pv_node, "probabilities are the right operand of the value product (v @ p)")
    value = pv_node.args[1]
    rank = len(shape(query) or ())
    if rank not in (3, 4) or len(shape(key_t) or ()) != rank or len(shape(value) or ()) not in (rank, 4) \
            or (len(shape(value)) != rank and not _values_of_folded_heads(query, value, probs_input)):
        return NotProvable(qk_node, "scores product operands are not all 3-D or all 4-D (broadcast products)")
    key = _untransposed(key_t, rank)
    return query, key if key is not None else key_t, value, [None] * 4, key is None, rank


def _values_of_folded_heads(query: fx.Node, value: fx.Node, probs: fx.Node) -> bool:
    """Scores of heads folded into the batch ([B*H, T, L], viewed as [B, H, T, L] on the way)
    weighting values [B, H, L, D] (GPT-NeoX-Japanese): the site folds the values and unfolds
    its output."""
    q_shape, v_shape, p_shape = shape(query), shape(value), shape(probs)
    return len(q_shape) == 3 and len(v_shape) == 4 and p_shape is not None and len(p_shape) == 4 \
        and tuple(p_shape[:2]) == tuple(v_shape[:2]) and math.prod(v_shape[:2]) == q_shape[0]


def _untransposed(node: fx.Node, rank: int) -> Optional[fx.Node]:
    """k when node is k with its last two axes swapped."""
    if is_op(node, "transpose"):
        dims = sorted(normalize_dim(d, rank) for d in node.args[1:3] if isinstance(d, int))
        if dims == [rank - 2, rank - 1]:
            return node.args[0]
    if is_op(node, "permute"):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if [normalize_dim(d, rank) for d in dims] == list(range(rank - 2)) + [rank - 1, rank - 2]:
            return node.args[0]
    return None


def _einsum_operands(node: fx.Node):
    equation = node.args[0]
    operands = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    return equation.replace(" ", ""), list(operands)


def _einsum_layout(qk_node: fx.Node, pv_node: fx.Node, probs_input: fx.Node):
    equation, operands = _einsum_operands(qk_node)
    if "..." in equation or "->" not in equation or len(operands) != 2:
        return NotProvable(qk_node, f"einsum {equation!r}: only explicit two-operand equations are read")
    (a, b), out = equation.split("->")[0].split(","), equation.split("->")[1]
    contracted = (set(a) & set(b)) - set(out)
    q_letter = [c for c in out if c in a and c not in b]
    k_letter = [c for c in out if c in b and c not in a]
    batch = [c for c in out if c in a and c in b]
    if len(contracted) != 1 or len(q_letter) != 1 or len(k_letter) != 1 or out[-2:] != q_letter[0] + k_letter[0] \
            or len(set(a)) != len(a) or len(set(b)) != len(b) or len(batch) + 2 != len(out) or len(batch) not in (1, 2) \
            or set(a) != set(batch) | set(q_letter) | contracted or set(b) != set(batch) | set(k_letter) | contracted:
        return NotProvable(qk_node, f"einsum {equation!r} is not q . k over one feature axis with scores [..., q, k]")
    d = contracted.pop()
    q_perm = [a.index(c) for c in batch + q_letter + [d]]
    k_perm = [b.index(c) for c in batch + k_letter + [d]]
    if not is_op(pv_node, "einsum"):
        return NotProvable(pv_node, "scores from einsum but values summed by matmul; mixed spellings not proven")
    pv_equation, pv_operands = _einsum_operands(pv_node)
    if "..." in pv_equation or len(pv_operands) != 2 or pv_operands[0] is not probs_input:
        return NotProvable(pv_node, f"einsum {pv_equation!r}: probabilities must be the first of two operands")
    (p, v), o = pv_equation.split("->")[0].split(","), pv_equation.split("->")[1]
    p_batch, p_q, p_k = list(p[:-2]), p[-2], p[-1]
    e_letters = [c for c in v if c not in p]
    if len(p) != len(out) or len(e_letters) != 1 or set(v) != set(p_batch) | {p_k} | set(e_letters) \
            or set(o) != set(p_batch) | {p_q} | set(e_letters) or len(o) != len(p) or len(set(v)) != len(v):
        return NotProvable(pv_node, f"einsum {pv_equation!r} is not probabilities [..., q, k] times values over k")
    e = e_letters[0]
    v_perm = [v.index(c) for c in p_batch + [p_k, e]]
    result = p_batch + [p_q, e]
    out_perm = [result.index(c) for c in o]
    identity = list(range(len(out)))
    permutes = [None if perm == identity else perm for perm in (q_perm, k_perm, v_perm, out_perm)]
    return operands[0], operands[1], pv_operands[1], permutes, False, len(out)


def _check_heads(match: AttentionMatch, softmax: fx.Node):
    q_shape, k_shape = shape(match.query), shape(match.key)
    if q_shape is None or k_shape is None:
        return NotProvable(softmax, "the capture recorded no shapes for query/key")
    q_shape = _permuted(q_shape, match.query_permute)
    k_shape = _permuted(k_shape, match.key_permute)
    if match.key_transposed:
        k_shape = (*k_shape[:-2], k_shape[-1], k_shape[-2])
    if q_shape[0] != k_shape[0]:
        return NotProvable(softmax, f"query batch {q_shape[0]} != key batch {k_shape[0]} (broadcast product)")
    if len(q_shape) == 4:
        if not isinstance(k_shape[1], int) or k_shape[1] < 1 or q_shape[1] % k_shape[1]:
            return NotProvable(softmax, f"query heads {q_shape[1]} are not a multiple of key heads {k_shape[1]}")
        match.gqa_groups = q_shape[1] // k_shape[1]
    return match


def _permuted(dims: tuple, perm: Optional[list]) -> tuple:
    return dims if perm is None else tuple(dims[i] for i in perm)
