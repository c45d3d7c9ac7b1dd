"""What batchseg writes and how it is encoded: the row schema, the output layout, COCO RLE and COCO
results. No torch, no Ray."""
