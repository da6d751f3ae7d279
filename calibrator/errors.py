"""Typed errors of the calibrator; the service maps each to one HTTP status in a single handler."""

from __future__ import annotations


class CalibrationError(Exception):
    """Base class; ``code`` is a stable machine-readable reason."""

    code = "calibration_error"


class InvalidTargetError(CalibrationError, ValueError):
    code = "invalid_target"


class TooFewSamplesError(CalibrationError):
    code = "too_few_samples"

    def __init__(self, available: int, required: int, what: str = "") -> None:
        self.available, self.required = available, required
        where = f" for {what}" if what else ""
        super().__init__(f"{available} sampled requests{where}, at least {required} are needed to calibrate")


class TargetUnreachableError(CalibrationError):
    """No τ gets within the tolerance of the target: it lies outside the achievable range, or — ``gap`` = the
    closest achievable fractions below and above it — in a jump of the mean curve (scores cluster around it)."""

    code = "target_unreachable"

    def __init__(
        self, target: float, achievable_min: float, achievable_max: float, protected: float,
        gap: tuple[float, float] | None = None,
    ) -> None:
        self.target, self.achievable_min, self.achievable_max = target, achievable_min, achievable_max
        self.gap = gap
        if gap is not None:
            super().__init__(
                f"target removed fraction {target:.4f} is not achievable on these requests: the sampled scores leave "
                f"a gap around it, the closest mean removed fractions a threshold on the bin layout gives are "
                f"{gap[0]:.4f} and {gap[1]:.4f}"
            )
            return
        reason = (
            f"; the protected window alone keeps {protected:.3f} of the entries on average"
            if target > achievable_max
            else ""
        )
        super().__init__(
            f"target removed fraction {target:.4f} is not achievable on these requests: thresholds on the bin "
            f"layout give a mean removed fraction between {achievable_min:.4f} and {achievable_max:.4f}{reason}"
        )


class UnknownModelError(CalibrationError, LookupError):
    code = "unknown_model"


class ThresholdNotFoundError(CalibrationError, LookupError):
    code = "threshold_not_found"


class ThresholdUnreadableError(ThresholdNotFoundError):
    """A record is stored for the series but is not a valid one (foreign or corrupt data, a τ out of bounds)."""

    code = "threshold_unreadable"


class StoreUnavailableError(CalibrationError):
    """Redis could not be reached or failed mid-operation; nothing was written (StoreOutcomeUnknownError: maybe)."""

    code = "store_unavailable"


class StoreOutcomeUnknownError(StoreUnavailableError):
    """Redis failed after a write was sent and before its reply arrived: the write may or may not have run."""

    code = "store_outcome_unknown"


class StoreBusyError(StoreUnavailableError):
    """Writers of the same series in other processes kept winning the race for every attempt; nothing was written,
    Redis is up: retry after a pause."""

    code = "store_busy"


class ThresholdChangedError(CalibrationError):
    """The threshold a calibration would replace was written (a PUT, another calibration) while it was fitting: the
    newer value is kept."""

    code = "threshold_changed"
