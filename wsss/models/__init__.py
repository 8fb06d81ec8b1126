"""Networks: backbones (ResNet-38, ResNet-50, a tiny CNN), DAEN's CSM attention, SEAM's PCM and the CAM network."""
from wsss.models.attention import CSM, ChannelAttention, SpatialAttention, build_attention
from wsss.models.backbones import Backbone, build_backbone
from wsss.models.cam_net import CAMNet
from wsss.models.pcm import PCM, normalize_affinity, prepare_cam
from wsss.models.weights import load_pretrained

__all__ = ["Backbone", "build_backbone", "ChannelAttention", "SpatialAttention", "CSM", "build_attention",
           "PCM", "prepare_cam", "normalize_affinity", "CAMNet", "load_pretrained"]
