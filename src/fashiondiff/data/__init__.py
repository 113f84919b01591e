"""FashionGen data: the HDF5 reader, extraction and the product split."""
