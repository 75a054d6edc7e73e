"""Write a synthetic DICOM X-ray of the bundled chest CT at a pose, to try ``prostlab register``.

    python scripts/synthetic_xray.py --pose 3 -5 6 8 -12 15 --out chest.dcm
    prostlab register --xray chest.dcm --ct data/chest_ct_128 --search --out reg/

The file is a 12-bit DX "for processing" image of 256 x 256 pixels of 1.46 mm at ProST's
distances (sdd 1020 mm, sid 620 mm) with Poisson noise and collimated borders
(:func:`prostlab.xray.write_synthetic_dicom`); ``--pose`` is the truth, a rotation vector in
degrees and a translation in mm (``docs/geometry.md``), which ``pose.json`` should give back.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from prostlab.data import example_path, load_prepared
from prostlab.geometry import Camera
from prostlab.xray import write_synthetic_dicom


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pose", type=float, nargs=6, default=[0.0] * 6,
                        metavar=("RX_DEG", "RY_DEG", "RZ_DEG", "TX_MM", "TY_MM", "TZ_MM"))
    parser.add_argument("--size", type=int, default=256, help="pixels per side")
    parser.add_argument("--pixel-spacing", type=float, default=1.46, help="mm")
    parser.add_argument("--bits", type=int, default=12, choices=(12, 16))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="the DICOM file to write")
    args = parser.parse_args()

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    ct = load_prepared(example_path()).ct
    camera = Camera(sdd=1020.0, sid=620.0, height=args.size, width=args.size,
                    pixel_spacing=(args.pixel_spacing, args.pixel_spacing))
    rotation = torch.deg2rad(torch.tensor(args.pose[:3], dtype=torch.float64))
    pose = torch.cat((rotation, torch.tensor(args.pose[3:], dtype=torch.float64)))[None]
    written = write_synthetic_dicom(args.out, ct, pose, camera, bits_stored=args.bits,
                                    seed=args.seed)
    print(f"wrote {written.path}: the bundled chest CT at rotation {args.pose[:3]} deg, "
          f"translation {args.pose[3:]} mm")


if __name__ == "__main__":
    main()
