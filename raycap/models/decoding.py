"""How captions are decoded unless a caller says otherwise: the reference's beam size and length cap.

One home for the defaults that training's validation, evaluation, Serve's requests and the bulk
job share; torch-free, so configs, the serving schema and `--help` name them without loading torch.
"""

BEAM_SIZE = 3  # beams kept per step
MAX_DECODE_LEN = 50  # words per caption at most
