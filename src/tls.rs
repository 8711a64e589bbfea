//! TLS settings shared by the Keycloak and SMTP clients.
//!
//! The crypto provider is ring and the trust anchors are the Mozilla roots
//! compiled into the binary, so the notifier needs no CA bundle and works in
//! a `FROM scratch` image. (reqwest's default verifier reads the system
//! store and fails to build a client where there is none, even for http.)

use std::sync::Arc;

use rustls::pki_types::CertificateDer;

/// A rustls client configuration: ring, the bundled roots plus `extra_roots`
/// (an internal CA from `KEYCLOAK_CA_FILE`), TLS 1.2 and 1.3.
pub fn client_config(
    extra_roots: &[CertificateDer<'static>],
) -> Result<rustls::ClientConfig, rustls::Error> {
    let mut roots =
        rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    for cert in extra_roots {
        roots.add(cert.clone())?;
    }
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_bundled_roots_are_present() {
        let config = super::client_config(&[]).unwrap();
        assert!(config.crypto_provider().cipher_suites.len() > 3);
        assert!(webpki_roots::TLS_SERVER_ROOTS.len() > 100);
    }
}
