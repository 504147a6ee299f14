from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TokenDtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_DTYPE_UNSPECIFIED: _ClassVar[TokenDtype]
    TOKEN_DTYPE_UINT16: _ClassVar[TokenDtype]
    TOKEN_DTYPE_UINT32: _ClassVar[TokenDtype]

class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPRESSION_NONE: _ClassVar[Compression]
    COMPRESSION_ZSTD: _ClassVar[Compression]
TOKEN_DTYPE_UNSPECIFIED: TokenDtype
TOKEN_DTYPE_UINT16: TokenDtype
TOKEN_DTYPE_UINT32: TokenDtype
COMPRESSION_NONE: Compression
COMPRESSION_ZSTD: Compression

class Cursor(_message.Message):
    __slots__ = ("version", "dataset", "fingerprint", "seed", "seq_len", "packing", "row", "epoch", "shard", "shard_row", "components")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    PACKING_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SHARD_ROW_FIELD_NUMBER: _ClassVar[int]
    COMPONENTS_FIELD_NUMBER: _ClassVar[int]
    version: int
    dataset: str
    fingerprint: str
    seed: int
    seq_len: int
    packing: str
    row: int
    epoch: int
    shard: int
    shard_row: int
    components: _containers.RepeatedCompositeFieldContainer[ComponentCursor]
    def __init__(self, version: _Optional[int] = ..., dataset: _Optional[str] = ..., fingerprint: _Optional[str] = ..., seed: _Optional[int] = ..., seq_len: _Optional[int] = ..., packing: _Optional[str] = ..., row: _Optional[int] = ..., epoch: _Optional[int] = ..., shard: _Optional[int] = ..., shard_row: _Optional[int] = ..., components: _Optional[_Iterable[_Union[ComponentCursor, _Mapping]]] = ...) -> None: ...

class ComponentCursor(_message.Message):
    __slots__ = ("dataset", "row", "epoch", "shard", "shard_row")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    SHARD_ROW_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    row: int
    epoch: int
    shard: int
    shard_row: int
    def __init__(self, dataset: _Optional[str] = ..., row: _Optional[int] = ..., epoch: _Optional[int] = ..., shard: _Optional[int] = ..., shard_row: _Optional[int] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("dataset", "seed", "seq_len", "batch_size", "packing", "rank", "world_size", "cursor", "first_step", "step_stride", "batches_per_message", "compression", "worker_id", "provenance", "max_tokens", "shared_memory", "skip_rows", "plan", "batches_adaptive")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    PACKING_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    FIRST_STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_STRIDE_FIELD_NUMBER: _ClassVar[int]
    BATCHES_PER_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    SKIP_ROWS_FIELD_NUMBER: _ClassVar[int]
    PLAN_FIELD_NUMBER: _ClassVar[int]
    BATCHES_ADAPTIVE_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    seed: int
    seq_len: int
    batch_size: int
    packing: str
    rank: int
    world_size: int
    cursor: Cursor
    first_step: int
    step_stride: int
    batches_per_message: int
    compression: Compression
    worker_id: int
    provenance: bool
    max_tokens: int
    shared_memory: SharedMemory
    skip_rows: int
    plan: _containers.RepeatedCompositeFieldContainer[PlanEdit]
    batches_adaptive: bool
    def __init__(self, dataset: _Optional[str] = ..., seed: _Optional[int] = ..., seq_len: _Optional[int] = ..., batch_size: _Optional[int] = ..., packing: _Optional[str] = ..., rank: _Optional[int] = ..., world_size: _Optional[int] = ..., cursor: _Optional[_Union[Cursor, _Mapping]] = ..., first_step: _Optional[int] = ..., step_stride: _Optional[int] = ..., batches_per_message: _Optional[int] = ..., compression: _Optional[_Union[Compression, str]] = ..., worker_id: _Optional[int] = ..., provenance: _Optional[bool] = ..., max_tokens: _Optional[int] = ..., shared_memory: _Optional[_Union[SharedMemory, _Mapping]] = ..., skip_rows: _Optional[int] = ..., plan: _Optional[_Iterable[_Union[PlanEdit, _Mapping]]] = ..., batches_adaptive: _Optional[bool] = ...) -> None: ...

class PlanEdit(_message.Message):
    __slots__ = ("op", "from_row", "at_step", "dataset", "shard", "document", "weights")
    class WeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    OP_FIELD_NUMBER: _ClassVar[int]
    FROM_ROW_FIELD_NUMBER: _ClassVar[int]
    AT_STEP_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    op: str
    from_row: int
    at_step: int
    dataset: str
    shard: int
    document: int
    weights: _containers.ScalarMap[str, float]
    def __init__(self, op: _Optional[str] = ..., from_row: _Optional[int] = ..., at_step: _Optional[int] = ..., dataset: _Optional[str] = ..., shard: _Optional[int] = ..., document: _Optional[int] = ..., weights: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SharedMemory(_message.Message):
    __slots__ = ("path", "nonce", "slots", "slot_bytes", "pipe")
    PATH_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    SLOT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PIPE_FIELD_NUMBER: _ClassVar[int]
    path: str
    nonce: bytes
    slots: int
    slot_bytes: int
    pipe: str
    def __init__(self, path: _Optional[str] = ..., nonce: _Optional[bytes] = ..., slots: _Optional[int] = ..., slot_bytes: _Optional[int] = ..., pipe: _Optional[str] = ...) -> None: ...

class BatchChunk(_message.Message):
    __slots__ = ("tokens", "dtype", "compression", "num_batches", "rows", "seq_len", "eos_id", "pad_id", "cursors", "steps", "epochs", "provenance", "provenance_counts", "piece_starts", "piece_start_counts", "shm_slot", "plan_edits")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    EOS_ID_FIELD_NUMBER: _ClassVar[int]
    PAD_ID_FIELD_NUMBER: _ClassVar[int]
    CURSORS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_COUNTS_FIELD_NUMBER: _ClassVar[int]
    PIECE_STARTS_FIELD_NUMBER: _ClassVar[int]
    PIECE_START_COUNTS_FIELD_NUMBER: _ClassVar[int]
    SHM_SLOT_FIELD_NUMBER: _ClassVar[int]
    PLAN_EDITS_FIELD_NUMBER: _ClassVar[int]
    tokens: bytes
    dtype: TokenDtype
    compression: Compression
    num_batches: int
    rows: int
    seq_len: int
    eos_id: int
    pad_id: int
    cursors: _containers.RepeatedCompositeFieldContainer[Cursor]
    steps: _containers.RepeatedScalarFieldContainer[int]
    epochs: _containers.RepeatedScalarFieldContainer[int]
    provenance: bytes
    provenance_counts: _containers.RepeatedScalarFieldContainer[int]
    piece_starts: _containers.RepeatedScalarFieldContainer[int]
    piece_start_counts: _containers.RepeatedScalarFieldContainer[int]
    shm_slot: int
    plan_edits: int
    def __init__(self, tokens: _Optional[bytes] = ..., dtype: _Optional[_Union[TokenDtype, str]] = ..., compression: _Optional[_Union[Compression, str]] = ..., num_batches: _Optional[int] = ..., rows: _Optional[int] = ..., seq_len: _Optional[int] = ..., eos_id: _Optional[int] = ..., pad_id: _Optional[int] = ..., cursors: _Optional[_Iterable[_Union[Cursor, _Mapping]]] = ..., steps: _Optional[_Iterable[int]] = ..., epochs: _Optional[_Iterable[int]] = ..., provenance: _Optional[bytes] = ..., provenance_counts: _Optional[_Iterable[int]] = ..., piece_starts: _Optional[_Iterable[int]] = ..., piece_start_counts: _Optional[_Iterable[int]] = ..., shm_slot: _Optional[int] = ..., plan_edits: _Optional[int] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ("dataset", "tokenizer_files")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FILES_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    tokenizer_files: bool
    def __init__(self, dataset: _Optional[str] = ..., tokenizer_files: _Optional[bool] = ...) -> None: ...

class TokenizerFile(_message.Message):
    __slots__ = ("name", "data")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    name: str
    data: bytes
    def __init__(self, name: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("name", "bytes", "documents", "tokens")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    name: str
    bytes: int
    documents: int
    tokens: int
    def __init__(self, name: _Optional[str] = ..., bytes: _Optional[int] = ..., documents: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class DatasetInfo(_message.Message):
    __slots__ = ("name", "tokenizer", "vocab_size", "eos_id", "pad_id", "bos_id", "fingerprint", "num_shards", "documents", "tokens", "shards", "dtype", "bad_records", "max_seq_len", "max_batch_size", "sources", "tokenizer_files")
    class BadRecordsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    EOS_ID_FIELD_NUMBER: _ClassVar[int]
    PAD_ID_FIELD_NUMBER: _ClassVar[int]
    BOS_ID_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BAD_RECORDS_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SOURCES_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FILES_FIELD_NUMBER: _ClassVar[int]
    name: str
    tokenizer: str
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int
    fingerprint: str
    num_shards: int
    documents: int
    tokens: int
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    dtype: TokenDtype
    bad_records: _containers.ScalarMap[str, int]
    max_seq_len: int
    max_batch_size: int
    sources: _containers.RepeatedCompositeFieldContainer[SourceInfo]
    tokenizer_files: _containers.RepeatedCompositeFieldContainer[TokenizerFile]
    def __init__(self, name: _Optional[str] = ..., tokenizer: _Optional[str] = ..., vocab_size: _Optional[int] = ..., eos_id: _Optional[int] = ..., pad_id: _Optional[int] = ..., bos_id: _Optional[int] = ..., fingerprint: _Optional[str] = ..., num_shards: _Optional[int] = ..., documents: _Optional[int] = ..., tokens: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ..., dtype: _Optional[_Union[TokenDtype, str]] = ..., bad_records: _Optional[_Mapping[str, int]] = ..., max_seq_len: _Optional[int] = ..., max_batch_size: _Optional[int] = ..., sources: _Optional[_Iterable[_Union[SourceInfo, _Mapping]]] = ..., tokenizer_files: _Optional[_Iterable[_Union[TokenizerFile, _Mapping]]] = ...) -> None: ...

class SourceInfo(_message.Message):
    __slots__ = ("name", "weight", "tokens", "rows_served")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ROWS_SERVED_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    tokens: int
    rows_served: int
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ..., tokens: _Optional[int] = ..., rows_served: _Optional[int] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("datasets", "server_version", "plan_edits")
    class PlanEditsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PLAN_EDITS_FIELD_NUMBER: _ClassVar[int]
    datasets: _containers.RepeatedCompositeFieldContainer[DatasetInfo]
    server_version: str
    plan_edits: _containers.ScalarMap[str, int]
    def __init__(self, datasets: _Optional[_Iterable[_Union[DatasetInfo, _Mapping]]] = ..., server_version: _Optional[str] = ..., plan_edits: _Optional[_Mapping[str, int]] = ...) -> None: ...
