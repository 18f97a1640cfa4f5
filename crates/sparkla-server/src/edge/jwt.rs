//! JWT verification (HS256 only) and the claims Sparkla uses.

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{Map, Value};
use std::collections::HashSet;

/// Allowed clock skew for `exp` and `nbf`, seconds.
const LEEWAY: u64 = 30;

/// The verifier (and signer, for admin URLs and tests) of one secret.
#[derive(Clone)]
pub struct Jwt {
    decoding: DecodingKey,
    encoding: EncodingKey,
    validation: Validation,
}

/// What a verified token says.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Claims {
    pub admin: bool,
    /// `session`: a partial SoftwareSession spread over requested sessions.
    pub session: Option<Map<String, Value>>,
    /// `client.id`, or `sub`.
    pub client_id: Option<String>,
}

impl Jwt {
    /// A verifier for `secret` (which must not be empty).
    pub fn new(secret: &str) -> Result<Self, String> {
        if secret.is_empty() {
            return Err("the JWT secret is empty".into());
        }
        let mut validation = Validation::new(Algorithm::HS256);
        validation.algorithms = vec![Algorithm::HS256];
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = false;
        validation.leeway = LEEWAY;
        // Executa's tokens often carry no exp: honour it when present, do not require it.
        validation.required_spec_claims = HashSet::new();
        Ok(Self {
            decoding: DecodingKey::from_secret(secret.as_bytes()).map_err(|e| e.to_string())?,
            encoding: EncodingKey::from_secret(secret.as_bytes()).map_err(|e| e.to_string())?,
            validation,
        })
    }

    /// Verify a token: signature (HS256 only: `none` and every other algorithm are
    /// refused), `exp` and `nbf`. The error is a short human-readable reason.
    pub fn verify(&self, token: &str) -> Result<Claims, String> {
        let data =
            jsonwebtoken::decode::<Map<String, Value>>(token, &self.decoding, &self.validation)
                .map_err(|e| {
                    use jsonwebtoken::errors::ErrorKind::*;
                    match e.kind() {
                        ExpiredSignature => "JWT has expired".to_string(),
                        ImmatureSignature => "JWT is not valid yet (nbf)".to_string(),
                        InvalidSignature => "JWT signature is invalid".to_string(),
                        InvalidAlgorithm | InvalidAlgorithmName => {
                            "JWT algorithm must be HS256".to_string()
                        }
                        _ => format!("JWT is invalid: {e}"),
                    }
                })?;
        let c = data.claims;
        Ok(Claims {
            admin: c.get("admin").and_then(Value::as_bool).unwrap_or(false),
            session: c.get("session").and_then(Value::as_object).cloned(),
            client_id: c
                .get("client")
                .and_then(|v| v.get("id"))
                .and_then(Value::as_str)
                .or_else(|| c.get("sub").and_then(Value::as_str))
                .map(str::to_string),
        })
    }

    /// Sign claims with HS256.
    pub fn sign(&self, claims: &Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &self.encoding)
            .expect("HS256 signing does not fail")
    }
}

/// A random secret (256 bits, hex).
pub fn generate_secret() -> String {
    format!(
        "{:032x}{:032x}",
        rand::random::<u128>(),
        rand::random::<u128>()
    )
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use serde_json::json;

    #[test]
    fn verification_cases() {
        let jwt = Jwt::new("s3cret").unwrap();
        let ok = jwt.sign(&json!({"admin":true,"session":{"cpuLimit":1},"client":{"id":"c1"}}));
        let c = jwt.verify(&ok).unwrap();
        assert!(c.admin);
        assert_eq!(c.client_id.as_deref(), Some("c1"));
        assert_eq!(c.session.unwrap()["cpuLimit"], 1);

        assert!(jwt
            .verify("not.a.jwt")
            .unwrap_err()
            .starts_with("JWT is invalid"));
        let other = Jwt::new("other").unwrap().sign(&json!({}));
        assert_eq!(jwt.verify(&other).unwrap_err(), "JWT signature is invalid");
        let expired = jwt.sign(&json!({"exp": now() - 3600}));
        assert_eq!(jwt.verify(&expired).unwrap_err(), "JWT has expired");
        let early = jwt.sign(&json!({"nbf": now() + 3600}));
        assert_eq!(
            jwt.verify(&early).unwrap_err(),
            "JWT is not valid yet (nbf)"
        );
        assert!(jwt.verify(&jwt.sign(&json!({"exp": now() + 3600}))).is_ok());

        // alg none: header {"alg":"none"}, no signature.
        let b64 = |v: Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
        let none = format!(
            "{}.{}.",
            b64(json!({"alg":"none","typ":"JWT"})),
            b64(json!({"admin":true}))
        );
        assert!(jwt.verify(&none).is_err());
        // HS512 with the right secret is refused too.
        let hs512 = jsonwebtoken::encode(
            &Header::new(Algorithm::HS512),
            &json!({"admin":true}),
            &EncodingKey::from_secret(b"s3cret").unwrap(),
        )
        .unwrap();
        assert_eq!(
            jwt.verify(&hs512).unwrap_err(),
            "JWT algorithm must be HS256"
        );
    }
}
