"""FashionGen data: the HDF5 reader, the synthetic writer, extraction and the product split."""
