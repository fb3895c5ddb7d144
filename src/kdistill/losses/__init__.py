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
from kdistill.losses.rkd import RKDLoss, rkd_angle_loss, rkd_distance_loss
from kdistill.losses.sp import SPLoss, sp_loss

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
    "KDLoss",
    "KDTopKLoss",
    "LogitStandardized",
    "Loss",
    "LossInfo",
    "MSEEmbeddingLoss",
    "MultiTeacherKD",
    "PKTLoss",
    "Projector",
    "RKDLoss",
    "SPLoss",
    "SimilarityContrastiveLoss",
    "StaticTargets",
    "TeacherBank",
    "TinyBERTAttention",
    "TinyBERTHidden",
    "UnknownNameError",
    "as_loss",
    "at_loss",
    "attention_map",
    "attention_mse",
    "attention_scores",
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
    "rkd_angle_loss",
    "rkd_distance_loss",
    "similarity_contrastive_loss",
    "sp_loss",
    "standardize_logits",
    "uniform_map",
]
