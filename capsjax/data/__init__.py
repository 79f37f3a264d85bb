"""The data: MNIST-format datasets and what the experiments make of them on the device.

  mnist       IDX files from a folder, tfds or a checksummed download (`load_dataset`)
  augment     the paper's random shifts
  multimnist  pairs of overlapping digits (section 6)
  affine      expanded MNIST, the generated affine test set, the affNIST reader (section 5.2)
"""

from capsjax.data.mnist import (
                                DATA_DIR_ENV,
                                DATASETS,
                                DataError,
                                Dataset,
                                check_labels,
                                load_dataset,
                                load_idx_dir,
)

__all__ = ['DATASETS', 'DATA_DIR_ENV', 'DataError', 'Dataset', 'check_labels', 'load_dataset',
           'load_idx_dir']
