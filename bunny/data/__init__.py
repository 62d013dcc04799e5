"""Data pipeline: record loading and validation, images, the lazy dataset, collator, grouping."""

from bunny.data.collator import DataCollator
from bunny.data.dataset import SupervisedDataset
from bunny.data.images import expand_to_square, load_image, process_image
from bunny.data.records import load_records
from bunny.data.sampler import ModalityLengthGroupedSampler, modality_length_grouped_indices
from bunny.data.validation import DataProblem, DataValidationError, validate_dataset, validate_records

__all__ = [
    "DataCollator",
    "DataProblem",
    "DataValidationError",
    "ModalityLengthGroupedSampler",
    "SupervisedDataset",
    "expand_to_square",
    "load_image",
    "load_records",
    "modality_length_grouped_indices",
    "process_image",
    "validate_dataset",
    "validate_records",
]
