// The widget's few strings, per locale. `dllmChatSettings.locale` picks one ("de", "fr-CH", …);
// unknown locales fall back to English.

export interface Strings {
  title: string;
  greeting: string;
  subtitle: string;
  open: string;
  close: string;
  placeholder: string;
  send: string;
  stop: string;
  thinking: string;
  sending: string;
  reconnecting: string;
  retry: string;
  stopped: string;
  handover: string;
  unread: (n: number) => string;
  errors: Record<string, string>;
}

const en: Strings = {
  title: "Support",
  greeting: "Hi! How can we help you today?",
  subtitle: "Answers in seconds",
  open: "Open chat",
  close: "Close chat",
  placeholder: "Type your message…",
  send: "Send",
  stop: "Stop",
  thinking: "Thinking…",
  sending: "Sending…",
  reconnecting: "Connection lost. Reconnecting…",
  retry: "Try again",
  stopped: "Stopped",
  handover: "Handed over to our team: a person will reply here.",
  unread: (n) => (n === 1 ? "1 unread message" : `${n} unread messages`),
  errors: {
    rate_limited: "You are sending messages too quickly. Please wait a moment and try again.",
    overloaded: "We are very busy right now. Please try again in a moment.",
    busy: "Still answering your previous message. Please wait for it to finish.",
    store_unavailable: "We could not save your message just now. Please try again.",
    generator_lost: "The answer was interrupted. Please try again.",
    context_overflow: "This conversation is too long for us to answer. Please start a shorter message.",
    message_too_large: "That message is too long. Please shorten it.",
    shutting_down: "We are restarting. Your message will be sent when we are back.",
    unauthorized: "This chat is not available on this site.",
    internal: "Something went wrong on our side. Please try again.",
    default: "Something went wrong. Please try again.",
  },
};

const de: Strings = {
  ...en,
  title: "Kundenservice",
  greeting: "Hallo! Wie können wir helfen?",
  subtitle: "Antworten in Sekunden",
  open: "Chat öffnen",
  close: "Chat schließen",
  placeholder: "Nachricht eingeben…",
  send: "Senden",
  stop: "Stopp",
  thinking: "Denke nach…",
  sending: "Wird gesendet…",
  reconnecting: "Verbindung unterbrochen. Verbinde neu…",
  retry: "Erneut versuchen",
  stopped: "Abgebrochen",
  handover: "An unser Team übergeben: Eine Person antwortet Ihnen hier.",
  unread: (n) => (n === 1 ? "1 ungelesene Nachricht" : `${n} ungelesene Nachrichten`),
  errors: {
    ...en.errors,
    rate_limited: "Sie senden zu schnell. Bitte warten Sie kurz und versuchen Sie es erneut.",
    overloaded: "Gerade ist viel los. Bitte versuchen Sie es gleich noch einmal.",
    busy: "Die vorige Antwort läuft noch. Bitte warten Sie, bis sie fertig ist.",
    store_unavailable: "Ihre Nachricht konnte gerade nicht gespeichert werden. Bitte erneut versuchen.",
    generator_lost: "Die Antwort wurde unterbrochen. Bitte erneut versuchen.",
    default: "Etwas ist schiefgelaufen. Bitte erneut versuchen.",
  },
};

const fr: Strings = {
  ...en,
  title: "Assistance",
  greeting: "Bonjour ! Comment pouvons-nous vous aider ?",
  subtitle: "Réponse en quelques secondes",
  open: "Ouvrir le chat",
  close: "Fermer le chat",
  placeholder: "Votre message…",
  send: "Envoyer",
  stop: "Arrêter",
  thinking: "Réflexion…",
  sending: "Envoi…",
  reconnecting: "Connexion perdue. Reconnexion…",
  retry: "Réessayer",
  stopped: "Arrêté",
  handover: "Transmis à notre équipe : une personne vous répondra ici.",
  unread: (n) => (n === 1 ? "1 message non lu" : `${n} messages non lus`),
  errors: {
    ...en.errors,
    rate_limited: "Vous envoyez des messages trop vite. Patientez un instant puis réessayez.",
    overloaded: "Nous sommes très sollicités. Réessayez dans un instant.",
    busy: "La réponse précédente est encore en cours. Merci de patienter.",
    store_unavailable: "Votre message n'a pas pu être enregistré. Réessayez.",
    generator_lost: "La réponse a été interrompue. Réessayez.",
    default: "Une erreur s'est produite. Réessayez.",
  },
};

const table: Record<string, Strings> = { en, de, fr };

/** The strings for `locale` (a BCP 47 tag); English when the language is not known. */
export function stringsFor(locale: string | undefined): Strings {
  const lang = (locale || navigator.language || "en").toLowerCase().split("-")[0];
  return table[lang] ?? en;
}
