"""Checks, before the first step, that a run's data can feed its method and agrees with its teacher.

Two silent failures this prevents: a method with a real-data term (CD's noised real samples, a GAN or density-ratio
discriminator) given a noise-only or prompt-only datamodule, which used to fail only at its first batch; and a toy
teacher whose law differs from the datamodule's, which trains against one law and scores against another.
"""
from __future__ import annotations

from .networks.mixture_law import law_sigma_data, same_law


def check_data_regime(module, datamodule) -> None:
    """Raise a ValueError naming the method, the datamodule and what is wrong; no-op without a datamodule."""
    if datamodule is None:
        return
    method, data = type(module).__name__, type(datamodule).__name__
    if module.needs_real_data and getattr(datamodule, "provides_real_data", None) is False:
        raise ValueError(f"{method} needs real data samples ({module.real_data_reason or 'a real-data term'}), but "
                         f"{data} provides none; use a datamodule with real samples: ToyMixtureDataModule (toy laws), "
                         f"MNISTDataModule / DigitsDataModule / ImageFolderDataModule (images) or ImageTextDataModule "
                         f"(image-caption pairs)")
    teacher_law, data_law = getattr(module.teacher, "law", None), getattr(datamodule, "law", None)
    if teacher_law is not None and data_law is not None and not same_law(teacher_law, data_law):
        raise ValueError(f"the teacher's law {teacher_law.name!r} ({teacher_law.num_components} components in "
                         f"{teacher_law.dim}-D) differs from {data}'s law {data_law.name!r} "
                         f"({data_law.num_components} components in {data_law.dim}-D); give the law once, under "
                         "data.init_args.law, and let the teacher take it with law: ${data.init_args.law}")


def derive_sigma_data(network, law) -> None:
    """Set a network's EDM sigma_data from the data law when its config left it unset (``sigma_data: null``, the
    toy MLP's default): the preconditioning is unit-variance only at the data's own scale (Karras et al. 2022, Sec. 5),
    and a user's own law may be far from the 0.5 of images in [-1, 1]."""
    if getattr(network, "sigma_data_from_law", False) and law is not None:
        network.sigma_data = law_sigma_data(law)
