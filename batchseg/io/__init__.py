"""Bytes in and out: storage (fsspec, retries), image manifests, image decoding. No torch, no Ray."""
