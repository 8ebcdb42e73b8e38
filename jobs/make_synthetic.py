"""Write the synthetic COCO-format data set: python jobs/make_synthetic.py --out DIR [--train N --val N --seed S]."""

from raycap.config import run_job
from raycap.data.synthetic import main

if __name__ == "__main__":
    run_job(main)
