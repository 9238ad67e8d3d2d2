//! The rustls configuration: system trust roots plus extra CAs, one crypto provider (ring), and an
//! explicit opt-out of verification. Built here rather than by rumqttc, whose default panics on a bad
//! system store.

use super::config::TlsOptions;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{ring, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::sync::{Arc, Mutex, PoisonError};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(ring::default_provider())
}

/// The system's trust roots, read and parsed once per process: reading them takes a few
/// milliseconds on Linux and can take a second on macOS (the keychain), and a client needs them at
/// every (re)connect. An empty store is not kept: it is read again next time (a certificate bundle
/// installed meanwhile).
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: Mutex<Option<Arc<RootCertStore>>> = Mutex::new(None);
    let mut kept = ROOTS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(roots) = kept.as_ref() {
        return Arc::clone(roots);
    }
    let native = rustls_native_certs::load_native_certs();
    for error in &native.errors {
        log::warn!("skipping part of the system trust store: {error}");
    }
    let mut roots = RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(native.certs);
    log::debug!("system trust store: {added} roots, {ignored} unusable");
    let roots = Arc::new(roots);
    if !roots.is_empty() {
        *kept = Some(Arc::clone(&roots));
    }
    roots
}

/// Builds the client TLS configuration, or says in words why it cannot.
pub fn client_config(options: &TlsOptions) -> Result<ClientConfig, String> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up failed: {e}"))?;
    if options.insecure {
        log::warn!(
            "TLS verification is OFF (tls_insecure=True): the broker's certificate and host name are not checked"
        );
        return Ok(builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider())))
            .with_no_client_auth());
    }
    let mut roots = system_roots().as_ref().clone();
    for pem in &options.extra_ca_pem {
        let mut count = 0;
        for cert in CertificateDer::pem_slice_iter(pem) {
            let cert =
                cert.map_err(|e| format!("the CA certificate could not be read as PEM: {e}"))?;
            roots
                .add(cert)
                .map_err(|e| format!("the CA certificate is not usable: {e}"))?;
            count += 1;
        }
        if count == 0 {
            return Err(
                "the CA file or text holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
                    .to_owned(),
            );
        }
    }
    if roots.is_empty() {
        return Err(
            "no trusted CA certificates: the system trust store is empty and no ca_file/ca_pem was given".to_owned(),
        );
    }
    Ok(builder.with_root_certificates(roots).with_no_client_auth())
}

/// Accepts any certificate: only with `tls_insecure=True`.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_system_roots_are_read_once() {
        let first = system_roots();
        if !first.is_empty() {
            assert!(
                Arc::ptr_eq(&first, &system_roots()),
                "read again for the second client"
            );
        }
    }

    #[test]
    fn bad_pem_is_a_clear_error() {
        let options = TlsOptions {
            extra_ca_pem: vec![b"not a certificate".to_vec()],
            insecure: false,
        };
        let err = client_config(&options).unwrap_err();
        assert!(err.contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn insecure_builds() {
        let options = TlsOptions {
            extra_ca_pem: vec![],
            insecure: true,
        };
        assert!(client_config(&options).is_ok());
    }
}
