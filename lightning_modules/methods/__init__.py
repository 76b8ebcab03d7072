"""Distillation methods: each file is one paper's algorithm box on the shared DistillationModule."""
from .agd import AdapterGuidanceDistillation
from .boot import BOOT
from .consistency import ConsistencyDistillation
from .consistency_family import ConsistencyTraining, TeacherFreeConsistency
from .diff_instruct import DiffInstruct
from .disback import DisBack
from .dmd import DMD
from .dmd2 import DMD2
from .ect import EasyConsistencyTuning
from .f_distill import FDistill
from .hipa import HiPA
from .instarevive import InstaRevive
from .ict import ImprovedConsistencyTraining
from .knowledge_distillation import KnowledgeDistillation
from .ladd import LADD
from .lcm import LatentConsistencyModel
from .meanflow import MeanFlow
from .multistep_cd import (MultistepConsistencyDistillation, MultistepConsistencyModel,
                           TrajectorySegmentedConsistencyDistillation)
from .msd import MSD
from .nct import NoiseConsistencyTraining
from .oftsr import OFTSR
from .progressive import GuidanceDistillation, ProgressiveDistillation
from .pso import PairwiseSampleOptimization
from .rectified_flow import InstaFlow, RectifiedFlow, RectifiedFlowPP, Reflow
from .rg_lcd import RewardGuidedLCD
from .sana_sprint import SANASprint
from .scm import ContinuousConsistencyDistillation, ContinuousConsistencyTraining
from .scott import SCott
from .sfd import SFD
from .sid import SiD
from .sida import SiDA
from .sim import SIM
from .slimflow import SlimFlow
from .tad_sr import TADSR
from .snoopi import SNOOPI
from .tdm import TrajectoryDistributionMatching
from .tcm import TruncatedConsistencyModel
from .uni_instruct import UniInstruct
from .vsd import VSD
from .yonos_sr import YONOSSR

METHODS = {"dmd2": DMD2, "sid": SiD, "cd": ConsistencyDistillation, "dmd": DMD, "diff_instruct": DiffInstruct,
           "disback": DisBack, "sim": SIM, "sida": SiDA,
           "msd": MSD, "sfd": SFD, "vsd": VSD, "snoopi": SNOOPI,
           "fdistill": FDistill, "uni_instruct": UniInstruct,
           "ict": ImprovedConsistencyTraining, "ect": EasyConsistencyTuning,
           "sct": ContinuousConsistencyTraining, "scd": ContinuousConsistencyDistillation, "meanflow": MeanFlow,
           "scott": SCott, "rg_lcd": RewardGuidedLCD,
           "rf1": RectifiedFlow, "reflow": Reflow, "rf2pp": RectifiedFlowPP, "instaflow": InstaFlow,
           "slimflow": SlimFlow,
           "lcm": LatentConsistencyModel, "mcd": MultistepConsistencyModel,
           "tscd": TrajectorySegmentedConsistencyDistillation, "tcm": TruncatedConsistencyModel,
           "kd": KnowledgeDistillation, "pd": ProgressiveDistillation, "guidance_distill": GuidanceDistillation,
           "boot": BOOT,
           "ladd": LADD, "sana_sprint": SANASprint,
           "hipa": HiPA, "pso": PairwiseSampleOptimization, "nct": NoiseConsistencyTraining,
           "agd": AdapterGuidanceDistillation, "tdm": TrajectoryDistributionMatching,
           "tad_sr": TADSR, "oftsr": OFTSR, "yonos_sr": YONOSSR, "instarevive": InstaRevive}
