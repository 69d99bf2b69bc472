from mmgpt.data.common import CaptionDataModule, CaptionDataset, DeviceBatches, tokenize_captions
from mmgpt.data.digits import DigitsDataModule
from mmgpt.data.features import DataFileError, FeaturesDataModule, load_features_file

__all__ = ["CaptionDataModule", "CaptionDataset", "DeviceBatches", "tokenize_captions", "DigitsDataModule",
           "DataFileError", "FeaturesDataModule", "load_features_file"]
