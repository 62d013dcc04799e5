"""Ids and strings shared by the templates, the data pipeline and the model."""

IGNORE_INDEX = -100  # label of positions that are not trained
IMAGE_TOKEN_INDEX = -200  # placeholder id spliced into input_ids where the image goes
DEFAULT_IMAGE_TOKEN = "<image>"
