from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ExportEvidenceRequest(_message.Message):
    __slots__ = ("client_id", "limit")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    limit: int
    def __init__(self, client_id: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class ExportEvidenceResponse(_message.Message):
    __slots__ = ("lines",)
    LINES_FIELD_NUMBER: _ClassVar[int]
    lines: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lines: _Optional[_Iterable[str]] = ...) -> None: ...

class EraseEvidenceRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class EraseEvidenceResponse(_message.Message):
    __slots__ = ("erased",)
    ERASED_FIELD_NUMBER: _ClassVar[int]
    erased: int
    def __init__(self, erased: _Optional[int] = ...) -> None: ...

class Client(_message.Message):
    __slots__ = ("client_id", "tier", "pinned_level", "blocked", "reason", "first_seen", "last_seen", "requests", "instances", "effective_level", "action", "risk", "detected_level", "risk_reasons", "timeline", "terms_version", "terms_required", "terms_accepted", "terms_admitted")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    PINNED_LEVEL_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEEN_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_LEVEL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    DETECTED_LEVEL_FIELD_NUMBER: _ClassVar[int]
    RISK_REASONS_FIELD_NUMBER: _ClassVar[int]
    TIMELINE_FIELD_NUMBER: _ClassVar[int]
    TERMS_VERSION_FIELD_NUMBER: _ClassVar[int]
    TERMS_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    TERMS_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    TERMS_ADMITTED_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    tier: str
    pinned_level: str
    blocked: bool
    reason: str
    first_seen: float
    last_seen: float
    requests: int
    instances: int
    effective_level: str
    action: str
    risk: float
    detected_level: str
    risk_reasons: _containers.RepeatedScalarFieldContainer[str]
    timeline: _containers.RepeatedCompositeFieldContainer[LevelChange]
    terms_version: str
    terms_required: bool
    terms_accepted: str
    terms_admitted: bool
    def __init__(self, client_id: _Optional[str] = ..., tier: _Optional[str] = ..., pinned_level: _Optional[str] = ..., blocked: _Optional[bool] = ..., reason: _Optional[str] = ..., first_seen: _Optional[float] = ..., last_seen: _Optional[float] = ..., requests: _Optional[int] = ..., instances: _Optional[int] = ..., effective_level: _Optional[str] = ..., action: _Optional[str] = ..., risk: _Optional[float] = ..., detected_level: _Optional[str] = ..., risk_reasons: _Optional[_Iterable[str]] = ..., timeline: _Optional[_Iterable[_Union[LevelChange, _Mapping]]] = ..., terms_version: _Optional[str] = ..., terms_required: _Optional[bool] = ..., terms_accepted: _Optional[str] = ..., terms_admitted: _Optional[bool] = ...) -> None: ...

class LevelChange(_message.Message):
    __slots__ = ("time", "level", "reasons")
    TIME_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    time: float
    level: str
    reasons: str
    def __init__(self, time: _Optional[float] = ..., level: _Optional[str] = ..., reasons: _Optional[str] = ...) -> None: ...

class GetClientRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class ListClientsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListClientsResponse(_message.Message):
    __slots__ = ("clients", "next_page_token")
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    clients: _containers.RepeatedCompositeFieldContainer[Client]
    next_page_token: str
    def __init__(self, clients: _Optional[_Iterable[_Union[Client, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ResetClientRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class ResetClientResponse(_message.Message):
    __slots__ = ("existed",)
    EXISTED_FIELD_NUMBER: _ClassVar[int]
    existed: bool
    def __init__(self, existed: _Optional[bool] = ...) -> None: ...

class SetClientLevelRequest(_message.Message):
    __slots__ = ("client_id", "level", "blocked", "reason", "ttl_seconds")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    level: str
    blocked: bool
    reason: str
    ttl_seconds: float
    def __init__(self, client_id: _Optional[str] = ..., level: _Optional[str] = ..., blocked: _Optional[bool] = ..., reason: _Optional[str] = ..., ttl_seconds: _Optional[float] = ...) -> None: ...
