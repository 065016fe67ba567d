from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Empty(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WeightsChunk(_message.Message):
    __slots__ = ("model_hash", "total_size", "data")
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    model_hash: str
    total_size: int
    data: bytes
    def __init__(self, model_hash: _Optional[str] = ..., total_size: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SignedRecord(_message.Message):
    __slots__ = ("record_bytes", "signature")
    RECORD_BYTES_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    record_bytes: bytes
    signature: bytes
    def __init__(self, record_bytes: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class SignedBlock(_message.Message):
    __slots__ = ("header_bytes", "signature")
    HEADER_BYTES_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    header_bytes: bytes
    signature: bytes
    def __init__(self, header_bytes: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class Cosignature(_message.Message):
    __slots__ = ("signer_key", "signature")
    SIGNER_KEY_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    signer_key: str
    signature: bytes
    def __init__(self, signer_key: _Optional[str] = ..., signature: _Optional[bytes] = ...) -> None: ...

class FitIns(_message.Message):
    __slots__ = ("round", "epochs", "batch_size", "lr", "momentum", "seed")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    round: int
    epochs: int
    batch_size: int
    lr: float
    momentum: float
    seed: int
    def __init__(self, round: _Optional[int] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node_id", "public_key", "address", "capacity", "samples", "partition_index")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    PARTITION_INDEX_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    public_key: str
    address: str
    capacity: int
    samples: int
    partition_index: int
    def __init__(self, node_id: _Optional[str] = ..., public_key: _Optional[str] = ..., address: _Optional[str] = ..., capacity: _Optional[int] = ..., samples: _Optional[int] = ..., partition_index: _Optional[int] = ...) -> None: ...

class RegisterReply(_message.Message):
    __slots__ = ("heartbeat_interval_s", "missed_beats")
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    MISSED_BEATS_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_s: float
    missed_beats: int
    def __init__(self, heartbeat_interval_s: _Optional[float] = ..., missed_beats: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "load")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    load: int
    def __init__(self, node_id: _Optional[str] = ..., load: _Optional[int] = ...) -> None: ...

class HeartbeatReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MemberEntry(_message.Message):
    __slots__ = ("info", "load", "alive", "role", "parent_id", "silent_s", "unreachable")
    INFO_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    PARENT_ID_FIELD_NUMBER: _ClassVar[int]
    SILENT_S_FIELD_NUMBER: _ClassVar[int]
    UNREACHABLE_FIELD_NUMBER: _ClassVar[int]
    info: NodeInfo
    load: int
    alive: bool
    role: str
    parent_id: str
    silent_s: float
    unreachable: str
    def __init__(self, info: _Optional[_Union[NodeInfo, _Mapping]] = ..., load: _Optional[int] = ..., alive: _Optional[bool] = ..., role: _Optional[str] = ..., parent_id: _Optional[str] = ..., silent_s: _Optional[float] = ..., unreachable: _Optional[str] = ...) -> None: ...

class ListRequest(_message.Message):
    __slots__ = ("include_dead",)
    INCLUDE_DEAD_FIELD_NUMBER: _ClassVar[int]
    include_dead: bool
    def __init__(self, include_dead: _Optional[bool] = ...) -> None: ...

class MemberList(_message.Message):
    __slots__ = ("members",)
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedCompositeFieldContainer[MemberEntry]
    def __init__(self, members: _Optional[_Iterable[_Union[MemberEntry, _Mapping]]] = ...) -> None: ...

class RoundPlan(_message.Message):
    __slots__ = ("algorithm", "lr", "local_epochs", "batch_size", "momentum", "seed", "aggregate", "record_updates")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    RECORD_UPDATES_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    lr: float
    local_epochs: int
    batch_size: int
    momentum: float
    seed: int
    aggregate: str
    record_updates: bool
    def __init__(self, algorithm: _Optional[str] = ..., lr: _Optional[float] = ..., local_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., momentum: _Optional[float] = ..., seed: _Optional[int] = ..., aggregate: _Optional[str] = ..., record_updates: _Optional[bool] = ...) -> None: ...

class RoundAnnouncement(_message.Message):
    __slots__ = ("round", "base_height", "base_model_hash", "proposer_id", "participants", "plan", "view", "target_round")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    PROPOSER_ID_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    TARGET_ROUND_FIELD_NUMBER: _ClassVar[int]
    round: int
    base_height: int
    base_model_hash: str
    proposer_id: str
    participants: _containers.RepeatedScalarFieldContainer[str]
    plan: RoundPlan
    view: int
    target_round: int
    def __init__(self, round: _Optional[int] = ..., base_height: _Optional[int] = ..., base_model_hash: _Optional[str] = ..., proposer_id: _Optional[str] = ..., participants: _Optional[_Iterable[str]] = ..., plan: _Optional[_Union[RoundPlan, _Mapping]] = ..., view: _Optional[int] = ..., target_round: _Optional[int] = ...) -> None: ...

class Failure(_message.Message):
    __slots__ = ("node_id", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class PartialHeader(_message.Message):
    __slots__ = ("round", "sn_id", "samples", "failures", "metrics", "timings")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TimingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SN_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    round: int
    sn_id: str
    samples: int
    failures: _containers.RepeatedCompositeFieldContainer[Failure]
    metrics: _containers.ScalarMap[str, float]
    timings: _containers.ScalarMap[str, float]
    def __init__(self, round: _Optional[int] = ..., sn_id: _Optional[str] = ..., samples: _Optional[int] = ..., failures: _Optional[_Iterable[_Union[Failure, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., timings: _Optional[_Mapping[str, float]] = ...) -> None: ...

class PartialPart(_message.Message):
    __slots__ = ("header", "record", "weights", "update")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    header: PartialHeader
    record: SignedRecord
    weights: WeightsChunk
    update: ForwardedUpdate
    def __init__(self, header: _Optional[_Union[PartialHeader, _Mapping]] = ..., record: _Optional[_Union[SignedRecord, _Mapping]] = ..., weights: _Optional[_Union[WeightsChunk, _Mapping]] = ..., update: _Optional[_Union[ForwardedUpdate, _Mapping]] = ...) -> None: ...

class ForwardedUpdate(_message.Message):
    __slots__ = ("record",)
    RECORD_FIELD_NUMBER: _ClassVar[int]
    record: SignedRecord
    def __init__(self, record: _Optional[_Union[SignedRecord, _Mapping]] = ...) -> None: ...

class BlockPart(_message.Message):
    __slots__ = ("block", "record", "weights", "cosignature", "info", "recorded")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    COSIGNATURE_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    block: SignedBlock
    record: SignedRecord
    weights: WeightsChunk
    cosignature: Cosignature
    info: ProposalInfo
    recorded: RecordedUpdateHead
    def __init__(self, block: _Optional[_Union[SignedBlock, _Mapping]] = ..., record: _Optional[_Union[SignedRecord, _Mapping]] = ..., weights: _Optional[_Union[WeightsChunk, _Mapping]] = ..., cosignature: _Optional[_Union[Cosignature, _Mapping]] = ..., info: _Optional[_Union[ProposalInfo, _Mapping]] = ..., recorded: _Optional[_Union[RecordedUpdateHead, _Mapping]] = ...) -> None: ...

class RecordedUpdateHead(_message.Message):
    __slots__ = ("record", "status", "reason")
    RECORD_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    record: SignedRecord
    status: str
    reason: str
    def __init__(self, record: _Optional[_Union[SignedRecord, _Mapping]] = ..., status: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ProposalInfo(_message.Message):
    __slots__ = ("view", "sender_id")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    SENDER_ID_FIELD_NUMBER: _ClassVar[int]
    view: int
    sender_id: str
    def __init__(self, view: _Optional[int] = ..., sender_id: _Optional[str] = ...) -> None: ...

class PromiseRequest(_message.Message):
    __slots__ = ("view", "candidate_id")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_ID_FIELD_NUMBER: _ClassVar[int]
    view: int
    candidate_id: str
    def __init__(self, view: _Optional[int] = ..., candidate_id: _Optional[str] = ...) -> None: ...

class PromiseReply(_message.Message):
    __slots__ = ("view", "head", "has_prepared", "prepared_height", "prepared_hash", "prepared_view", "target_round")
    VIEW_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    HAS_PREPARED_FIELD_NUMBER: _ClassVar[int]
    PREPARED_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PREPARED_HASH_FIELD_NUMBER: _ClassVar[int]
    PREPARED_VIEW_FIELD_NUMBER: _ClassVar[int]
    TARGET_ROUND_FIELD_NUMBER: _ClassVar[int]
    view: int
    head: Head
    has_prepared: bool
    prepared_height: int
    prepared_hash: str
    prepared_view: int
    target_round: int
    def __init__(self, view: _Optional[int] = ..., head: _Optional[_Union[Head, _Mapping]] = ..., has_prepared: _Optional[bool] = ..., prepared_height: _Optional[int] = ..., prepared_hash: _Optional[str] = ..., prepared_view: _Optional[int] = ..., target_round: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("height", "hash", "cosignatures")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    COSIGNATURES_FIELD_NUMBER: _ClassVar[int]
    height: int
    hash: str
    cosignatures: _containers.RepeatedCompositeFieldContainer[Cosignature]
    def __init__(self, height: _Optional[int] = ..., hash: _Optional[str] = ..., cosignatures: _Optional[_Iterable[_Union[Cosignature, _Mapping]]] = ...) -> None: ...

class CommitReply(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Head(_message.Message):
    __slots__ = ("empty", "height", "hash", "model_hash")
    EMPTY_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    empty: bool
    height: int
    hash: str
    model_hash: str
    def __init__(self, empty: _Optional[bool] = ..., height: _Optional[int] = ..., hash: _Optional[str] = ..., model_hash: _Optional[str] = ...) -> None: ...

class HeightRange(_message.Message):
    __slots__ = ("from_height", "to_height")
    FROM_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    TO_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    from_height: int
    to_height: int
    def __init__(self, from_height: _Optional[int] = ..., to_height: _Optional[int] = ...) -> None: ...

class Height(_message.Message):
    __slots__ = ("height",)
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    height: int
    def __init__(self, height: _Optional[int] = ...) -> None: ...

class StatusReply(_message.Message):
    __slots__ = ("node_id", "role", "head", "edges", "supernodes", "training", "paused", "round", "validators", "secure", "view", "proposer", "ledger_error")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    HEAD_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    SUPERNODES_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    VALIDATORS_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    VIEW_FIELD_NUMBER: _ClassVar[int]
    PROPOSER_FIELD_NUMBER: _ClassVar[int]
    LEDGER_ERROR_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    role: str
    head: Head
    edges: int
    supernodes: int
    training: bool
    paused: bool
    round: int
    validators: _containers.RepeatedScalarFieldContainer[str]
    secure: bool
    view: int
    proposer: str
    ledger_error: str
    def __init__(self, node_id: _Optional[str] = ..., role: _Optional[str] = ..., head: _Optional[_Union[Head, _Mapping]] = ..., edges: _Optional[int] = ..., supernodes: _Optional[int] = ..., training: _Optional[bool] = ..., paused: _Optional[bool] = ..., round: _Optional[int] = ..., validators: _Optional[_Iterable[str]] = ..., secure: _Optional[bool] = ..., view: _Optional[int] = ..., proposer: _Optional[str] = ..., ledger_error: _Optional[str] = ...) -> None: ...

class TokensReply(_message.Message):
    __slots__ = ("supernode", "edge")
    SUPERNODE_FIELD_NUMBER: _ClassVar[int]
    EDGE_FIELD_NUMBER: _ClassVar[int]
    supernode: str
    edge: str
    def __init__(self, supernode: _Optional[str] = ..., edge: _Optional[str] = ...) -> None: ...

class RotateRequest(_message.Message):
    __slots__ = ("role",)
    ROLE_FIELD_NUMBER: _ClassVar[int]
    role: str
    def __init__(self, role: _Optional[str] = ...) -> None: ...

class RemoveRequest(_message.Message):
    __slots__ = ("node_id",)
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    def __init__(self, node_id: _Optional[str] = ...) -> None: ...

class MembershipReply(_message.Message):
    __slots__ = ("height", "hash", "validators")
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    VALIDATORS_FIELD_NUMBER: _ClassVar[int]
    height: int
    hash: str
    validators: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, height: _Optional[int] = ..., hash: _Optional[str] = ..., validators: _Optional[_Iterable[str]] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("rounds",)
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    rounds: int
    def __init__(self, rounds: _Optional[int] = ...) -> None: ...

class TrainProgress(_message.Message):
    __slots__ = ("round", "height", "block_hash", "participants", "failures", "metrics", "message", "timings", "error", "excluded", "dropped")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class TimingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    round: int
    height: int
    block_hash: str
    participants: int
    failures: int
    metrics: _containers.ScalarMap[str, float]
    message: str
    timings: _containers.ScalarMap[str, float]
    error: bool
    excluded: _containers.RepeatedCompositeFieldContainer[Failure]
    dropped: _containers.RepeatedCompositeFieldContainer[Failure]
    def __init__(self, round: _Optional[int] = ..., height: _Optional[int] = ..., block_hash: _Optional[str] = ..., participants: _Optional[int] = ..., failures: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., message: _Optional[str] = ..., timings: _Optional[_Mapping[str, float]] = ..., error: _Optional[bool] = ..., excluded: _Optional[_Iterable[_Union[Failure, _Mapping]]] = ..., dropped: _Optional[_Iterable[_Union[Failure, _Mapping]]] = ...) -> None: ...

class EvalReply(_message.Message):
    __slots__ = ("loss", "accuracy", "samples", "edges", "edge_accuracy_mean", "edge_accuracy_min", "edge_accuracy_max")
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EDGES_FIELD_NUMBER: _ClassVar[int]
    EDGE_ACCURACY_MEAN_FIELD_NUMBER: _ClassVar[int]
    EDGE_ACCURACY_MIN_FIELD_NUMBER: _ClassVar[int]
    EDGE_ACCURACY_MAX_FIELD_NUMBER: _ClassVar[int]
    loss: float
    accuracy: float
    samples: int
    edges: _containers.RepeatedCompositeFieldContainer[EdgeEval]
    edge_accuracy_mean: float
    edge_accuracy_min: float
    edge_accuracy_max: float
    def __init__(self, loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., samples: _Optional[int] = ..., edges: _Optional[_Iterable[_Union[EdgeEval, _Mapping]]] = ..., edge_accuracy_mean: _Optional[float] = ..., edge_accuracy_min: _Optional[float] = ..., edge_accuracy_max: _Optional[float] = ...) -> None: ...

class EdgeEval(_message.Message):
    __slots__ = ("node_id", "loss", "accuracy", "samples", "error")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    loss: float
    accuracy: float
    samples: int
    error: str
    def __init__(self, node_id: _Optional[str] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., samples: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class SaveRequest(_message.Message):
    __slots__ = ("path",)
    PATH_FIELD_NUMBER: _ClassVar[int]
    path: str
    def __init__(self, path: _Optional[str] = ...) -> None: ...

class SaveReply(_message.Message):
    __slots__ = ("path", "model_hash")
    PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_HASH_FIELD_NUMBER: _ClassVar[int]
    path: str
    model_hash: str
    def __init__(self, path: _Optional[str] = ..., model_hash: _Optional[str] = ...) -> None: ...

class BlockView(_message.Message):
    __slots__ = ("block", "records", "hash")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    HASH_FIELD_NUMBER: _ClassVar[int]
    block: SignedBlock
    records: _containers.RepeatedCompositeFieldContainer[SignedRecord]
    hash: str
    def __init__(self, block: _Optional[_Union[SignedBlock, _Mapping]] = ..., records: _Optional[_Iterable[_Union[SignedRecord, _Mapping]]] = ..., hash: _Optional[str] = ...) -> None: ...

class VerifyReply(_message.Message):
    __slots__ = ("ok", "blocks", "message")
    OK_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    blocks: int
    message: str
    def __init__(self, ok: _Optional[bool] = ..., blocks: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("role", "token_id", "public_key", "tls_public_key", "hosts", "nonce", "key_proof", "mac")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    TLS_PUBLIC_KEY_FIELD_NUMBER: _ClassVar[int]
    HOSTS_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    KEY_PROOF_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    role: str
    token_id: str
    public_key: str
    tls_public_key: bytes
    hosts: _containers.RepeatedScalarFieldContainer[str]
    nonce: bytes
    key_proof: bytes
    mac: bytes
    def __init__(self, role: _Optional[str] = ..., token_id: _Optional[str] = ..., public_key: _Optional[str] = ..., tls_public_key: _Optional[bytes] = ..., hosts: _Optional[_Iterable[str]] = ..., nonce: _Optional[bytes] = ..., key_proof: _Optional[bytes] = ..., mac: _Optional[bytes] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("ca_certificate", "certificate", "mac")
    CA_CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    ca_certificate: bytes
    certificate: bytes
    mac: bytes
    def __init__(self, ca_certificate: _Optional[bytes] = ..., certificate: _Optional[bytes] = ..., mac: _Optional[bytes] = ...) -> None: ...

class FitRequest(_message.Message):
    __slots__ = ("ins", "weights")
    INS_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    ins: FitIns
    weights: WeightsChunk
    def __init__(self, ins: _Optional[_Union[FitIns, _Mapping]] = ..., weights: _Optional[_Union[WeightsChunk, _Mapping]] = ...) -> None: ...

class FitSummary(_message.Message):
    __slots__ = ("samples", "metrics", "record", "train_s")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    RECORD_FIELD_NUMBER: _ClassVar[int]
    TRAIN_S_FIELD_NUMBER: _ClassVar[int]
    samples: int
    metrics: _containers.ScalarMap[str, float]
    record: SignedRecord
    train_s: float
    def __init__(self, samples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., record: _Optional[_Union[SignedRecord, _Mapping]] = ..., train_s: _Optional[float] = ...) -> None: ...

class FitReply(_message.Message):
    __slots__ = ("summary", "weights")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    summary: FitSummary
    weights: WeightsChunk
    def __init__(self, summary: _Optional[_Union[FitSummary, _Mapping]] = ..., weights: _Optional[_Union[WeightsChunk, _Mapping]] = ...) -> None: ...
