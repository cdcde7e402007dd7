from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "kind", "num_classes", "num_frames", "image_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    IMAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    kind: str
    num_classes: int
    num_frames: int
    image_size: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., kind: _Optional[str] = ..., num_classes: _Optional[int] = ..., num_frames: _Optional[int] = ..., image_size: _Optional[int] = ...) -> None: ...

class HealthRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class HealthResponse(_message.Message):
    __slots__ = ("status", "model")
    class ServingStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SERVING_STATUS_UNSPECIFIED: _ClassVar[HealthResponse.ServingStatus]
        SERVING: _ClassVar[HealthResponse.ServingStatus]
        NOT_SERVING: _ClassVar[HealthResponse.ServingStatus]
    SERVING_STATUS_UNSPECIFIED: HealthResponse.ServingStatus
    SERVING: HealthResponse.ServingStatus
    NOT_SERVING: HealthResponse.ServingStatus
    STATUS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    status: HealthResponse.ServingStatus
    model: ModelInfo
    def __init__(self, status: _Optional[_Union[HealthResponse.ServingStatus, str]] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class ClassesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ClassesResponse(_message.Message):
    __slots__ = ("classes", "model")
    CLASSES_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    classes: _containers.RepeatedScalarFieldContainer[str]
    model: ModelInfo
    def __init__(self, classes: _Optional[_Iterable[str]] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class PredictRequest(_message.Message):
    __slots__ = ("images", "top_k")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedScalarFieldContainer[bytes]
    top_k: int
    def __init__(self, images: _Optional[_Iterable[bytes]] = ..., top_k: _Optional[int] = ...) -> None: ...

class Prediction(_message.Message):
    __slots__ = ("action", "confidence")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    action: str
    confidence: float
    def __init__(self, action: _Optional[str] = ..., confidence: _Optional[float] = ...) -> None: ...

class PredictResponse(_message.Message):
    __slots__ = ("action", "confidence", "all_predictions", "model", "latency_ms", "num_frames")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    ALL_PREDICTIONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    NUM_FRAMES_FIELD_NUMBER: _ClassVar[int]
    action: str
    confidence: float
    all_predictions: _containers.RepeatedCompositeFieldContainer[Prediction]
    model: ModelInfo
    latency_ms: float
    num_frames: int
    def __init__(self, action: _Optional[str] = ..., confidence: _Optional[float] = ..., all_predictions: _Optional[_Iterable[_Union[Prediction, _Mapping]]] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ..., latency_ms: _Optional[float] = ..., num_frames: _Optional[int] = ...) -> None: ...
