"""The contract between the LLM service and the encoder service, imported by both.

`media` holds the domain types both sides speak (modality, media references, encoded
items, `mm://` handles), `dtypes` the one dtype table, `chunks` the in-band row codec,
`shm` the same-host handshake and region files, `convert` the protobuf edge of all that.
Nothing here imports either service.
"""
