"""Networks behind one Denoiser contract: exact Gaussian-mixture teacher, toy MLP, diffusers UNets."""
from .denoiser import Denoiser
from .diffusers_adapter import DiffusersUNetDenoiser
from .gaussian_mixture import GaussianMixture, GaussianMixtureTeacher
from .mlp import ToyMLPDenoiser
from .preconditioning import edm_coefficients, edm_precondition
from .toy_laws import TOY_LAWS, get_toy_law
from .discriminator import DiscriminatorHead
from .denoiser import FeatureTap
from .routing import ConditionRoutedStudents
from .lora import LoRACritic
from .autoencoder import LatentAutoencoder
from .prompted_mixture import MixturePromptEncoder, PromptedMixtureTeacher
from .transformer_teachers import PixArtTransformerDenoiser, SD3TransformerDenoiser
from .edm_pickle import EDMPickleTeacher
