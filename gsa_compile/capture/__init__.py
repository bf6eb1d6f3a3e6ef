"""Capture routes: how a model reaches the GSA rewrite (torch.compile backend, torch.export,
the Hugging Face attention interface)."""
