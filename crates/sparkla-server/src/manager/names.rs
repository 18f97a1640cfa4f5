//! Session ids (unguessable), names (human-friendly) and ISO dates.

use std::time::{SystemTime, UNIX_EPOCH};

/// A new session id: `se` + 128 random bits in hex (from the OS-seeded CSPRNG).
pub fn session_id() -> String {
    format!("se{:032x}", rand::random::<u128>())
}

/// Whether `id` has the form of a session id made by [`session_id`].
pub fn is_session_id(id: &str) -> bool {
    id.len() == 34 && id.starts_with("se") && id[2..].bytes().all(|b| b.is_ascii_hexdigit())
}

const ADJECTIVES: &[&str] = &[
    "ancient",
    "autumn",
    "bold",
    "brave",
    "bright",
    "calm",
    "cool",
    "crimson",
    "damp",
    "dawn",
    "eager",
    "fancy",
    "floral",
    "fragrant",
    "gentle",
    "golden",
    "green",
    "hidden",
    "holy",
    "icy",
    "jolly",
    "late",
    "lingering",
    "little",
    "lively",
    "long",
    "misty",
    "morning",
    "muddy",
    "nameless",
    "noisy",
    "old",
    "patient",
    "polished",
    "proud",
    "quiet",
    "rapid",
    "restless",
    "rough",
    "shy",
    "silent",
    "small",
    "snowy",
    "solitary",
    "sparkling",
    "spring",
    "still",
    "summer",
    "swift",
    "twilight",
    "wandering",
    "weathered",
    "wild",
    "winter",
    "wispy",
    "withered",
    "young",
];

const NOUNS: &[&str] = &[
    "bird",
    "breeze",
    "brook",
    "bush",
    "butterfly",
    "cherry",
    "cloud",
    "darkness",
    "dawn",
    "dew",
    "dream",
    "dust",
    "feather",
    "field",
    "fire",
    "firefly",
    "flower",
    "fog",
    "forest",
    "frog",
    "frost",
    "glade",
    "glitter",
    "grass",
    "haze",
    "hill",
    "lake",
    "leaf",
    "meadow",
    "moon",
    "morning",
    "mountain",
    "night",
    "paper",
    "pine",
    "pond",
    "rain",
    "resonance",
    "river",
    "sea",
    "shadow",
    "shape",
    "silence",
    "sky",
    "smoke",
    "snow",
    "sound",
    "star",
    "sun",
    "sunset",
    "surf",
    "thunder",
    "tree",
    "violet",
    "voice",
    "water",
    "waterfall",
    "wave",
    "wildflower",
    "wind",
];

/// A human-friendly name like `ancient-breeze` (not unique: ids are).
pub fn session_name() -> String {
    let a = ADJECTIVES[rand::random_range(0..ADJECTIVES.len())];
    let n = NOUNS[rand::random_range(0..NOUNS.len())];
    format!("{a}-{n}")
}

/// `2026-12-03T10:00:00.000Z`.
pub fn iso_now() -> String {
    iso(SystemTime::now())
}

pub fn iso(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let millis = d.subsec_millis();
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, day) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ids_are_distinct_and_recognised() {
        let a = session_id();
        let b = session_id();
        assert_ne!(a, b);
        assert!(is_session_id(&a), "{a}");
        assert!(!is_session_id("se123"));
        assert!(!is_session_id("ws://1.2.3.4/10.0.0.1/9000/se123"));
        assert!(session_name().contains('-'));
    }

    #[test]
    fn iso_dates() {
        assert_eq!(iso(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            iso(UNIX_EPOCH + Duration::from_millis(1_796_292_000_123)),
            "2026-12-03T10:00:00.123Z"
        );
        assert_eq!(
            iso(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00.000Z"
        );
    }
}
