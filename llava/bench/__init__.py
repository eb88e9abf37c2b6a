"""Side-by-side training benchmark: this project's trainer against transformers' Llava + Trainer."""
