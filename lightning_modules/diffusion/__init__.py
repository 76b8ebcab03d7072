"""Diffusion core: schedules, prediction-space conversions, time samplers, ODE/student samplers and guidance."""
from .parameterization import PREDICTION_SPACES, canonical_space, convert, from_x0, to_x0
from .schedules import (EDMSchedule, NoiseSchedule, RectifiedFlowSchedule, TrigFlowSchedule, VPContinuousSchedule,
                        VPDiscreteSchedule, broadcast_to_data, karras_sigmas)
from .time_samplers import (DiscreteUniformTime, KarrasIndexTime, KarrasRampTime, LogitNormalTime, LogNormalTime,
                            TimeSampler, UniformTime)
from .samplers import (ddim_step, euler_sample, heun_sample, heun_step, sampler_times, prior_sample,
                       student_sample, student_steps, hybrid_sample, teacher_sample)
from .guidance import classifier_free_guidance, guided_x0
