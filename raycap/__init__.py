"""raycap: distributed image captioning (Show, Attend and Tell) on Ray."""

__version__ = "0.1.0"
