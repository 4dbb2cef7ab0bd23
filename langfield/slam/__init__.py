"""Online mapping (``langfield slam``): RGB-D frames in, a language Gaussian map and camera
poses out. :class:`Mapper` is the frame-by-frame API (see :mod:`langfield.slam.online`);
:func:`run_slam` writes a normal run folder (see :mod:`langfield.slam.run`)."""

from langfield.slam.keyframes import KeyframeConfig
from langfield.slam.mapper import GaussianMap, MapperConfig
from langfield.slam.online import Mapper, SlamConfig, prepare_frame
from langfield.slam.tracker import TrackerConfig, TrackResult, pose_error, track

__all__ = ["Mapper", "SlamConfig", "TrackerConfig", "MapperConfig", "KeyframeConfig", "GaussianMap", "track",
           "TrackResult", "pose_error", "prepare_frame"]
