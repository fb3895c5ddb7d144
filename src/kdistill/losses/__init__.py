"""Distillation methods, one file each, all behind one registry (``kdistill list methods``)."""

from __future__ import annotations

from kdistill.losses.at import ATLoss, at_loss, attention_map
from kdistill.losses.attention import TinyBERTAttention, attention_mse, attention_scores
from kdistill.losses.base import (
    LOSSES,
    BaseLoss,
    Loss,
    LossInfo,
    UnknownNameError,
    as_loss,
    defines_hook,
    get_loss,
    list_losses,
    register_loss,
)
from kdistill.losses.byot import DeepSupervision
from kdistill.losses.chunked import chunked_head_loss, chunked_token_loss
from kdistill.losses.compose import Compose, compose_methods
from kdistill.losses.contrastive import SimilarityContrastiveLoss, similarity_contrastive_loss
from kdistill.losses.crd import CRDLoss, contrastive_loss
from kdistill.losses.dist import DISTLoss, dist_loss
from kdistill.losses.dkd import DKDLoss, dkd_loss
from kdistill.losses.embedding import CosineEmbeddingLoss, MSEEmbeddingLoss, cosine_loss, mse_embedding_loss
from kdistill.losses.fitnet import FitNet, hint_loss
from kdistill.losses.hidden import TinyBERTHidden, hidden_mse, uniform_map
from kdistill.losses.kd import CrossEntropy, KDLoss, cross_entropy, kd_loss
from kdistill.losses.kd_topk import KDTopKLoss, kd_topk_loss
from kdistill.losses.logit_std import LogitStandardized, standardize_logits
from kdistill.losses.multi_teacher import MultiTeacherKD, confidence_weights, multi_teacher_loss
from kdistill.losses.pkt import PKTLoss, pkt_loss
from kdistill.losses.prepare import StaticTargets, TeacherBank, prepare_loss
from kdistill.losses.projector import Projector
from kdistill.losses.regression import LabelMSE, RegressionKD, regression_kd_loss
from kdistill.losses.rkd import RKDLoss, rkd_angle_loss, rkd_distance_loss
from kdistill.losses.sp import SPLoss, sp_loss
from kdistill.losses.token import (
    ForwardKL,
    GeneralizedJSD,
    ReverseKL,
    SkewForwardKL,
    SkewReverseKL,
    TokenDivergenceLoss,
    TotalVariation,
    token_distill_loss,
)

__all__ = [
    "LOSSES",
    "ATLoss",
    "BaseLoss",
    "CRDLoss",
    "Compose",
    "CosineEmbeddingLoss",
    "CrossEntropy",
    "DISTLoss",
    "DKDLoss",
    "DeepSupervision",
    "FitNet",
    "ForwardKL",
    "GeneralizedJSD",
    "KDLoss",
    "KDTopKLoss",
    "LabelMSE",
    "LogitStandardized",
    "Loss",
    "LossInfo",
    "MSEEmbeddingLoss",
    "MultiTeacherKD",
    "PKTLoss",
    "Projector",
    "RKDLoss",
    "RegressionKD",
    "ReverseKL",
    "SPLoss",
    "SimilarityContrastiveLoss",
    "SkewForwardKL",
    "SkewReverseKL",
    "StaticTargets",
    "TeacherBank",
    "TinyBERTAttention",
    "TinyBERTHidden",
    "TokenDivergenceLoss",
    "TotalVariation",
    "UnknownNameError",
    "as_loss",
    "at_loss",
    "attention_map",
    "attention_mse",
    "attention_scores",
    "chunked_head_loss",
    "chunked_token_loss",
    "compose_methods",
    "confidence_weights",
    "contrastive_loss",
    "cosine_loss",
    "cross_entropy",
    "defines_hook",
    "dist_loss",
    "dkd_loss",
    "get_loss",
    "hidden_mse",
    "hint_loss",
    "kd_loss",
    "kd_topk_loss",
    "list_losses",
    "mse_embedding_loss",
    "multi_teacher_loss",
    "pkt_loss",
    "prepare_loss",
    "register_loss",
    "regression_kd_loss",
    "rkd_angle_loss",
    "rkd_distance_loss",
    "similarity_contrastive_loss",
    "sp_loss",
    "standardize_logits",
    "token_distill_loss",
    "uniform_map",
]
