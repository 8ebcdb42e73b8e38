"""Models: image encoder, GRU and attention decoders, greedy and beam decoding. No Ray here."""
