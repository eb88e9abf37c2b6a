"""Data pipeline: readers, chat-template tokenization, images, dataset, sampler, collator."""
