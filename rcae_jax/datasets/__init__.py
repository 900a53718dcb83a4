"""Data sources: MVTec-layout folder discovery, decoding, the built-in category."""
