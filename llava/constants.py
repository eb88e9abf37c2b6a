"""Constants shared by the data pipeline and the model; this module imports nothing."""

# Label value that cross-entropy ignores (prompt tokens, image placeholders, padding).
IGNORE_INDEX = -100

# The tag that marks where an image goes in a conversation's text.
IMAGE_TOKEN = "<image>"

# Sentinel id written into input_ids once per image token (num_image_tokens per image).
# It is never looked up in the embedding table: the model maps it to a valid id first and
# then overwrites those positions with projected image features.
IMAGE_PLACEHOLDER_ID = -200

# Optional markers around an image (the original --mm_use_im_start_end flag).
IMAGE_START_TOKEN = "<im_start>"
IMAGE_END_TOKEN = "<im_end>"
IMAGE_PATCH_TOKEN = "<im_patch>"

# The tag that marks where a video goes (its frames' features, in order).
VIDEO_TOKEN = "<video>"
