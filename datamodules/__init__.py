"""DataModules for the three regimes: data-free noise, toy mixtures with exact laws (and, later, prompts and images)."""
from .noise import NoiseBatches, NoiseDataModule
from .toy import ToyMixtureDataModule
from .images import ImageDataModule, LabelledImages, MNISTDataModule
from .image_sources import DigitsDataModule, ImageFolderDataModule
from .pairs import MNISTPairsDataModule, ToyMixturePairsDataModule
from .prompts import PromptDataModule, read_prompts
from .image_text import ImageTextDataModule
