"""Data: COCO records, the synthetic COCO-format set, vocabulary, image decoding. No Ray here."""
