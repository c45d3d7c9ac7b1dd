"""The read side: open an output, SQL over it, COCO export and evaluation, overlays and the HTML report.
No torch, no Ray."""
