"""A GeoTIFF writer for test inputs (the tests make rasters with odd CRSs, shifts, band counts, no georeferencing)."""
import warnings

import rasterio
import rasterio.errors


def write_geotiff(path, data, crs, transform):
    """Write (C,H,W) `data` to `path`; crs=None writes a raster without georeferencing. Returns the path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    georef = {} if crs is None else {"crs": crs, "transform": transform}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2],
                           count=data.shape[0], dtype=data.dtype, **georef) as dst:
            dst.write(data)
    return path
