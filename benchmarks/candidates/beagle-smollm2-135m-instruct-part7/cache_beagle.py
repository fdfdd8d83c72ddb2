"""The key/value cache of Beagle's cross-attention.

Beagle's keys and values are projections of context states (method.md §2). Between draft rounds the cache holds
the projected *true* states of every token the target has read. Inside a round, draft states are appended lazily
after them and dropped when the round ends. Rows of a batch may receive different numbers of states per round;
`valid` marks which slots hold a state, and `positions` the sequence position each one encodes (used for the
causal rule "key position < query position").

Storage grows by doubling, so appending one state per draft step costs no reallocation in the common case.
"""

import torch


class BeagleCache:
    """Cross-attention key/value store: true states first, then the current round's draft states."""

    def __init__(self) -> None:
        self._keys: torch.Tensor | None = None  # (batch, kv_heads, capacity, head_dim)
        self._values: torch.Tensor | None = None
        self._positions: torch.Tensor | None = None  # (batch, capacity), long
        self._valid: torch.Tensor | None = None  # (batch, capacity), bool
        self._features: torch.Tensor | None = None  # (batch, capacity, hidden): config.query_newest_state only
        self.length = 0  # slots in use
        self.num_true = 0  # the first `num_true` slots hold true states

    # ----------------------------------------------------------------------------------------------------- views
    @property
    def keys(self) -> torch.Tensor:
        return self._keys[:, :, : self.length]

    @property
    def values(self) -> torch.Tensor:
        return self._values[:, :, : self.length]

    @property
    def positions(self) -> torch.Tensor:
        return self._positions[:, : self.length]

    @property
    def valid(self) -> torch.Tensor:
        return self._valid[:, : self.length]

    @property
    def features(self) -> torch.Tensor | None:
        """Each slot's state projected for the queries that read it as their newest (`query_newest_state`)."""
        return None if self._features is None else self._features[:, : self.length]

    @property
    def num_draft(self) -> int:
        return self.length - self.num_true

    @property
    def batch_size(self) -> int:
        return 0 if self._keys is None else self._keys.shape[0]

    def get_seq_length(self) -> int:
        """Number of slots in use (true and draft), including padding slots."""
        return self.length

    def __len__(self) -> int:
        return self.length

    # ----------------------------------------------------------------------------------------------- mutation
    def append(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        valid: torch.Tensor | None = None,
        draft: bool = False,
        features: torch.Tensor | None = None,
    ) -> None:
        """Append projected states: `keys`/`values` `(batch, kv_heads, n, head_dim)`, `positions` `(batch, n)`,
        and `features` `(batch, n, hidden)` when the model fuses the newest state into its queries (then every append
        carries them).

        True states may only be appended when the cache holds no draft states (call `discard_drafts` first):
        the cache never mixes a finished round's drafts with the true states that replace them.
        """
        batch, heads, n, head_dim = keys.shape
        if values.shape != keys.shape:
            raise ValueError(f"BeagleCache.append: `values` shape expected {tuple(keys.shape)}, found {tuple(values.shape)}.")
        if positions.shape != (batch, n):
            raise ValueError(f"BeagleCache.append: `positions` shape expected {(batch, n)}, found {tuple(positions.shape)}.")
        if valid is None:
            valid = torch.ones(batch, n, dtype=torch.bool, device=keys.device)
        elif valid.shape != (batch, n):
            raise ValueError(f"BeagleCache.append: `valid` shape expected {(batch, n)}, found {tuple(valid.shape)}.")
        if not draft and self.num_draft:
            raise RuntimeError(
                f"BeagleCache.append: {self.num_draft} draft states are still cached; call `discard_drafts()` "
                "before appending true states."
            )
        if self._keys is not None and (self._keys.shape[0], self._keys.shape[1], self._keys.shape[3]) != (batch, heads, head_dim):
            raise ValueError(
                "BeagleCache.append: (batch, kv_heads, head_dim) expected "
                f"{(self._keys.shape[0], self._keys.shape[1], self._keys.shape[3])}, found {(batch, heads, head_dim)}."
            )
        if (features is None) != (self._features is None) and self._keys is not None:
            expected = "present" if self._features is not None else "absent"
            raise ValueError(f"BeagleCache.append: `features` expected {expected} like every earlier append (one model "
                             f"fills a cache), found {'absent' if features is None else 'present'}.")
        if features is not None and features.shape[:2] != (batch, n):
            raise ValueError(f"BeagleCache.append: `features` shape expected {(batch, n)} + (hidden,), found "
                             f"{tuple(features.shape)}.")
        self._reserve(self.length + n, keys, positions, features)
        end = self.length + n
        self._keys[:, :, self.length : end] = keys
        self._values[:, :, self.length : end] = values
        self._positions[:, self.length : end] = positions
        self._valid[:, self.length : end] = valid
        if features is not None:
            self._features[:, self.length : end] = features
        self.length = end
        if not draft:
            self.num_true = end

    def discard_drafts(self) -> None:
        """End a draft round: forget every draft state (their slots are reused)."""
        self.length = self.num_true

    def select_batch(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows in `indices` (in that order), e.g. when finished rows leave a batch."""
        if self._keys is None:
            return
        self._keys = self._keys[indices]
        self._values = self._values[indices]
        self._positions = self._positions[indices]
        self._valid = self._valid[indices]
        if self._features is not None:
            self._features = self._features[indices]

    def reset(self) -> None:
        self.__init__()

    def _reserve(self, needed: int, like: torch.Tensor, like_positions: torch.Tensor,
                 like_features: torch.Tensor | None = None) -> None:
        capacity = 0 if self._keys is None else self._keys.shape[2]
        if needed <= capacity:
            return
        new_capacity = max(needed, 2 * capacity, 64)
        batch, heads, _, head_dim = like.shape
        keys = like.new_zeros(batch, heads, new_capacity, head_dim)
        values = like.new_zeros(batch, heads, new_capacity, head_dim)
        positions = like_positions.new_zeros(batch, new_capacity)
        valid = torch.zeros(batch, new_capacity, dtype=torch.bool, device=like.device)
        features = None
        if like_features is not None:
            features = like_features.new_zeros(batch, new_capacity, like_features.shape[-1])
        if self._keys is not None:
            keys[:, :, : self.length] = self.keys
            values[:, :, : self.length] = self.values
            positions[:, : self.length] = self.positions
            valid[:, : self.length] = self.valid
            if features is not None:
                features[:, : self.length] = self.features
        self._keys, self._values, self._positions, self._valid = keys, values, positions, valid
        self._features = features

    def __repr__(self) -> str:
        return f"BeagleCache(batch={self.batch_size}, true={self.num_true}, draft={self.num_draft})"


__all__ = ["BeagleCache"]
