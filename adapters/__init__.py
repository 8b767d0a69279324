"""Ecosystem glue: one module per ecosystem (webdataset, streaming, torchdata, open_clip)."""
