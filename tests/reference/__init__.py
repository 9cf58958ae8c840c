"""Compact PyTorch references written from docs/reference-model.md (FastViTHD, MCP), used only by tests."""
