from mmgpt.data.common import CaptionDataModule, CaptionDataset, Collate
from mmgpt.data.digits import DigitsDataModule
from mmgpt.data.features import DataFileError, FeaturesDataModule, load_features_file

__all__ = ["CaptionDataModule", "CaptionDataset", "Collate", "DigitsDataModule", "DataFileError",
           "FeaturesDataModule", "load_features_file"]
