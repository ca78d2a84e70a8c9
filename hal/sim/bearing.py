"""Rolling-element bearing geometry and its characteristic defect frequencies.

A defect on a race or ball is struck once per passing element, so each defect type shows up as
an impulse train at a fixed multiple ("order") of the shaft frequency:

    FTF  (cage)         = 1/2 (1 - d/D cos a)
    BPFO (outer race)   = n/2 (1 - d/D cos a)
    BPFI (inner race)   = n/2 (1 + d/D cos a)
    BSF  (ball spin)    = D/(2d) (1 - (d/D cos a)^2)

n balls of diameter d on pitch diameter D, contact angle a. The outer race is taken as
stationary, the usual mounting.
"""
from __future__ import annotations

import math

from pydantic import Field, model_validator

from hal.schema import StrictModel

FAULT_NAMES = ("BPFO", "BPFI", "BSF", "FTF")


class BearingGeometry(StrictModel):
    balls: int = Field(gt=0, description="number of rolling elements")
    ball_diameter: float = Field(gt=0, description="any length unit, the same as pitch_diameter")
    pitch_diameter: float = Field(gt=0, description="any length unit, the same as ball_diameter")
    contact_angle_deg: float = Field(0.0, ge=0, lt=90)

    @model_validator(mode="after")
    def _ball_fits(self):
        if self.ball_diameter >= self.pitch_diameter:
            raise ValueError(f"ball_diameter ({self.ball_diameter}) must be smaller than "
                             f"pitch_diameter ({self.pitch_diameter})")
        return self

    def fault_orders(self) -> dict[str, float]:
        """Defect frequencies as multiples of the shaft frequency: keys BPFO, BPFI, BSF, FTF."""
        r = self.ball_diameter / self.pitch_diameter * math.cos(math.radians(self.contact_angle_deg))
        n = self.balls
        return {
            "BPFO": n / 2 * (1 - r),
            "BPFI": n / 2 * (1 + r),
            "BSF": self.pitch_diameter / (2 * self.ball_diameter) * (1 - r * r),
            "FTF": 0.5 * (1 - r),
        }

    def fault_frequencies(self, shaft_hz: float) -> dict[str, float]:
        """Defect frequencies in Hz for a shaft turning at shaft_hz (rpm / 60)."""
        if not shaft_hz > 0:
            raise ValueError(f"shaft_hz must be positive, got {shaft_hz}")
        return {name: order * shaft_hz for name, order in self.fault_orders().items()}


# SKF 6205-2RS JEM, the drive-end bearing of the Case Western Reserve University test rig
# (dimensions in inches, as CWRU publishes them).
CWRU_DRIVE_END = BearingGeometry(balls=9, ball_diameter=0.3126, pitch_diameter=1.537)
