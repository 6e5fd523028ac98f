//! The geolocation port on a MaxMind-format city database (GeoIP2/GeoLite2 City layout),
//! read whole into memory at start.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

use serde::Deserialize;
use sessiond_core::geo::{Locator, Place};

/// A city database.
pub struct MmdbLocator(maxminddb::Reader<Vec<u8>>);

impl std::fmt::Debug for MmdbLocator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmdbLocator").finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct Record {
    #[serde(default)]
    country: Option<Country>,
    #[serde(default)]
    city: Option<City>,
    #[serde(default)]
    location: Option<Location>,
}

#[derive(Deserialize)]
struct Country {
    #[serde(default)]
    iso_code: Option<String>,
}

#[derive(Deserialize)]
struct City {
    #[serde(default)]
    names: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct Location {
    #[serde(default)]
    latitude: Option<f64>,
    #[serde(default)]
    longitude: Option<f64>,
}

impl MmdbLocator {
    /// Opens the database; the message says what is wrong with the file.
    pub fn open(path: &Path) -> Result<Self, String> {
        let reader = maxminddb::Reader::open_readfile(path)
            .map_err(|e| format!("geoip_db: cannot read {}: {e}", path.display()))?;
        Ok(Self(reader))
    }
}

impl Locator for MmdbLocator {
    fn locate(&self, ip: IpAddr) -> Option<Place> {
        let found = self.0.lookup(ip).ok()?;
        let r: Record = found.decode().ok().flatten()?;
        Some(Place {
            country: r.country.and_then(|c| c.iso_code),
            city: r.city.and_then(|c| c.names.get("en").cloned()),
            coordinates: r
                .location
                .and_then(|l| l.latitude.zip(l.longitude))
                .filter(|(la, lo)| la.is_finite() && lo.is_finite()),
        })
    }
}
