//! Reading a JWT's `exp` claim, to refresh a token before it runs out.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

/// The `exp` claim (seconds since the epoch) of a JWT, if it has one. The signature is not checked:
/// the broker does that; the client only needs to know when to ask for a new token.
pub fn expiry(token: &str) -> Option<i64> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?;
    exp.as_i64().or_else(|| {
        // A float `exp` is allowed by the JWT spec; whole seconds are enough here.
        #[allow(clippy::cast_possible_truncation)]
        exp.as_f64().map(|f| f as i64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(claims: &str) -> String {
        format!("e30.{}.c2ln", URL_SAFE_NO_PAD.encode(claims))
    }

    #[test]
    fn reads_exp() {
        assert_eq!(
            expiry(&token(r#"{"sub":"alice","exp":1731067326}"#)),
            Some(1_731_067_326)
        );
        assert_eq!(
            expiry(&token(r#"{"exp":1731067326.5}"#)),
            Some(1_731_067_326)
        );
        assert_eq!(expiry(&token(r#"{"sub":"alice"}"#)), None);
        assert_eq!(expiry("not-a-jwt"), None);
        assert_eq!(expiry("a.!!!.c"), None);
    }
}
