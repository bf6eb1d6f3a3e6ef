"""Capture routes: each produces an FX graph, runs the one pass pipeline (gsa_compile.passes)
and hands the rewritten graph on.

- dynamo_backend: torch.compile(model, backend="gsa")
- export: gsa_compile.export(...) -> torch.export ExportedProgram holding gsa nodes
- hf: the Hugging Face attention-interface route (gsa_compile.capture.hf)

Modules load on use, so importing this package costs nothing."""
