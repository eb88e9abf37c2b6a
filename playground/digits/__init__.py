"""The embedded demo: a tiny LLaVA learns to read scikit-learn's handwritten digits on a CPU."""
