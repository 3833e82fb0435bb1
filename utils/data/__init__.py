"""Data: reading scans, finding datasets, splits, preprocessing, the volume cache, datasets.

    nifti_io       NIfTI / DICOM reading and writing, HU checks
    discovery      finding a MosMedData-style folder and its labelled scans
    splits         the frozen train / val / test split (splits.csv)
    preprocessing  HU window, resampling, crop / pad to the network input
    cache          preprocessed volumes on disk, keyed by file and settings
    dataset        the torch Dataset over the cache (train-time flips)
    phantoms       the embedded synthetic chest-CT phantom set: config, one phantom, the dataset writer
    phantom_anatomy  anatomy, lesions and difficulty presets the phantoms are drawn from
    phantom_masks  a phantom file's lesion mask drawn again and put on the network input's grid
    medmnist       MedMNIST 3D .npz files with their official split
"""
