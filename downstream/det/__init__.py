"""Object detection fine-tuned from pretrained encoders (boxes in COCO sets, e.g. nuclei from DSB2018)."""
