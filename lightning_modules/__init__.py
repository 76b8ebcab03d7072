"""Diffusion distillation on PyTorch Lightning: the core (diffusion math, networks, DistillationModule) and methods."""
from .base import DistillationModule
from .methods import (METHODS, ConsistencyDistillation, EasyConsistencyTuning, ImprovedConsistencyTraining,
                      DiffInstruct, DisBack, DMD, DMD2, FDistill, MSD, SFD, SiD,
                      SiDA, SIM, SNOOPI, UniInstruct, VSD, ContinuousConsistencyTraining,
                      ContinuousConsistencyDistillation, MeanFlow, SCott, RewardGuidedLCD, RectifiedFlow, Reflow,
                      RectifiedFlowPP, InstaFlow, SlimFlow, LatentConsistencyModel, MultistepConsistencyModel,
                      TrajectorySegmentedConsistencyDistillation, TruncatedConsistencyModel,
                      KnowledgeDistillation, ProgressiveDistillation, GuidanceDistillation, BOOT,
                      LADD, SANASprint, HiPA, PairwiseSampleOptimization, NoiseConsistencyTraining,
                      AdapterGuidanceDistillation, TrajectoryDistributionMatching,
                      TADSR, OFTSR, YONOSSR, InstaRevive)
from .teacher_training import DenoisingScoreMatching
