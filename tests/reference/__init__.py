"""Compact PyTorch references written from SPEC.md (FastViTHD, MCP), used only by tests."""
