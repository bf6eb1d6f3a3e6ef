"""`gsa-compile npu-check`: can the Ascend NPU backend run here, and do its kernels agree with the
reference on this device."""

from __future__ import annotations


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "npu-check", help="diagnose torch_npu and compare the NPU kernels with the reference on a device")
    parser.add_argument("--device", default="npu", help="device to run the NPU kernels on (default npu)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--keys", type=int, default=4096, help="cached keys per row (default 4096)")
    parser.add_argument("--chunk", type=int, default=128, help="tokens per block (default 128)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from ..kernels.npu.runtime import torch_npu
    from ..kernels.npu.selfcheck import self_check
    from ..tables import format_table, write_json

    # Raises GSABackendUnavailable, naming what is missing, when torch_npu cannot serve.
    results = self_check(args.device, batch=args.batch, keys=args.keys, chunk=args.chunk)
    version = getattr(torch_npu(), "__version__", "?")
    print(f"torch_npu {version}: NPU kernels on {args.device} vs the reference on cpu")
    rows = [("op", "case", "result", "ok")]
    rows += [(r.op, r.case, r.error, "yes" if r.ok else "NO") for r in results]
    print(format_table(rows))
    if args.json:
        write_json(args.json, [r.as_dict() for r in results])
    return 0 if all(r.ok for r in results) else 1
